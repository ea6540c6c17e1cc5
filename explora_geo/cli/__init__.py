"""The ``explora-geo`` command line: a thin layer over the library.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` to a function ``run(args) -> int``. Modules are discovered, so adding a command
means adding a module. Heavy imports (torch, rasterio) happen inside ``run``, so ``--help`` stays fast.

User errors (:class:`explora_geo.errors.ExploraGeoError`) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from explora_geo.errors import ExploraGeoError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered sub-command."""
    from explora_geo import __version__

    parser = argparse.ArgumentParser(
        prog="explora-geo",
        description="ExPLoRA for Earth observation: parameter-efficient extended pre-training of ViTs.",
    )
    parser.add_argument("--version", action="version", version=f"explora-geo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``explora-geo`` console script. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ExploraGeoError as err:
        print(f"explora-geo {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"explora-geo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

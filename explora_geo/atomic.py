"""Atomic file output: nothing half-written, ever.

Every file explora-geo writes for the user (backbones, sidecars, ONNX bundles, statistics, plots, chips) goes
through :func:`atomic_paths`: the writer writes to temporary names in the destination folders, and only when
all of them are complete are they moved onto their targets with ``os.replace`` (atomic on POSIX within one
file system). If anything fails, or the user interrupts, the temporaries are deleted and the targets keep
their previous content. Files get the usual permissions (the process umask), unlike ``tempfile.mkstemp``'s
0600.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_paths", "write_text_atomic"]


def _temporary_name(target: Path) -> Path:
    # Same folder (so os.replace stays on one file system), hidden, unique per process and call, and with the
    # target's suffix so that writers choosing a format by extension (matplotlib, GDAL) still do the right thing.
    return target.with_name(f".{target.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{target.suffix}")


@contextmanager
def atomic_paths(*targets: str | os.PathLike[str]) -> Iterator[tuple[Path, ...]]:
    """Temporary paths beside ``targets``, moved onto them when the ``with`` block succeeds.

    Example::

        with atomic_paths(out / "model.safetensors", out / "model.json") as (tmp_weights, tmp_json):
            save_file(tensors, tmp_weights)
            tmp_json.write_text(text)
        # both targets now hold the new files; on an exception neither was touched

    The targets are replaced in the order given, so put the file that marks completion (a sidecar) last.
    Parent folders are created.
    """
    paths = [Path(t) for t in targets]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporaries = tuple(_temporary_name(p) for p in paths)
    try:
        yield temporaries
        for tmp, path in zip(temporaries, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_paths(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return Path(path)

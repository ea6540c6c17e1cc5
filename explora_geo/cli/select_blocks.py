"""``explora-geo select-blocks``: rank candidate unfreeze specs by short equal-budget ExPLoRA trials.

Takes ``pretrain``'s settings (``--config``, ``--bands``, ``--model``, ``--weights``, ``--rank``, ``--objective``,
``--img-size``, ...; same meanings) plus the search's own flags; see docs/pretraining.md and
:mod:`explora_geo.block_selection`.
"""

from __future__ import annotations

import argparse
import json
import sys

from explora_geo.cli.pretrain import RUN_ONLY, add_run_arguments, load_config_file, merge_settings
from explora_geo.errors import ExploraGeoError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``select-blocks`` sub-command."""
    p = subparsers.add_parser(
        "select-blocks",
        help="choose which blocks ExPLoRA unfreezes: successive halving over short equal-budget trials",
        description="Train every candidate unfreeze spec for the same short budget (same objective, data, LoRA "
                    "rank and seed), score it by the SSL loss on held-out patches never used for training (and "
                    "by kNN accuracy with --labels), and keep halving the field. Prints one JSON line (ranking "
                    "best first) and writes search.json and search.png (score against step) to --out.",
    )
    add_run_arguments(p, skip=RUN_ONLY)
    a = p.add_argument
    a("--candidates", nargs="+", metavar="SPEC",
      help="unfreeze specs in paper notation, e.g. L 1,L L-1,L none (default: a set for the model's depth)")
    a("--steps", type=int, required=True, help="optimiser steps of a full trial (the budget of every candidate)")
    a("--eta", type=int, default=2, help="successive halving: keep the best 1/eta at each rung (default 2)")
    a("--holdout", type=float, default=0.2,
      help="fraction of every raster's rows (the bottom) kept out of training for the score (default 0.2)")
    a("--val-samples", type=int, default=64, help="held-out patches scored at every validation (default 64)")
    a("--labels", metavar="DIR", help="labelled chips (one sub-folder per class): also rank by kNN accuracy")
    a("--file-bands", help="band order of the --labels files when they do not name their bands (eurosat, or "
                           "names)")
    a("--prescreen", action="store_true",
      help="zero-cost pre-screen (first-order gradient per block on target data) and its agreement with the "
           "trials")
    a("--prescreen-keep", type=int, metavar="K", help="with --prescreen: trial only the best K candidates")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Search and print one JSON line: the ranking (best first), the best spec, the plot."""
    from explora_geo.block_selection import SearchSettings, select_blocks
    from explora_geo.training import PretrainConfig

    file_settings = load_config_file(args.config) if args.config else {}
    settings = merge_settings(file_settings, args)
    for key in ("unfreeze", "max_steps", "resume", "overwrite"):
        settings.pop(key, None)  # the search sets them per trial
    if not settings.get("out"):
        raise ExploraGeoError("no output folder; pass --out DIR (or set out: in the config).")
    config = PretrainConfig.from_dict(settings, source=args.config or "the settings")
    search = SearchSettings(candidates=args.candidates, steps=args.steps, eta=args.eta, holdout=args.holdout,
                            val_samples=args.val_samples, labels=args.labels, file_bands=args.file_bands,
                            prescreen=args.prescreen or args.prescreen_keep is not None,
                            prescreen_keep=args.prescreen_keep)
    result = select_blocks(config, search, config.out,
                           echo=lambda m: print(m, file=sys.stderr, flush=True))
    line = {"ranking": [{k: v for k, v in item.items() if k != "val_history"} for item in result["ranking"]],
            **{k: v for k, v in result.items() if k != "ranking"}}
    print(json.dumps(line))
    return 0

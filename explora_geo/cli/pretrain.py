"""``explora-geo pretrain``: ExPLoRA extended pre-training (MAE or DINOv2) on unlabelled imagery.

Settings come from ``--config FILE.yaml`` (keys = :class:`explora_geo.training.PretrainConfig` fields) and the
flags; a flag given on the command line overrides the file. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from explora_geo.errors import ExploraGeoError

#: flag destination -> PretrainConfig field (the same name unless listed in _SHORTCUTS).
_FIELDS = ("data", "bands", "sensor", "model", "weights", "objective", "unfreeze", "rank", "alpha", "max_steps",
           "batch_size", "accumulate", "lr", "warmup_steps", "min_lr", "grad_clip", "img_size", "patch_size",
           "normalization", "stats", "accelerator", "devices", "num_nodes", "strategy", "precision", "seed", "workers",
           "checkpoint_every", "log_every", "out", "resume", "overwrite", "max_nodata_fraction", "search_steps")
#: flag destination -> (objective section, key)
_SHORTCUTS = {"mask_ratio": ("mae", "mask_ratio"), "norm_pix_loss": ("mae", "norm_pix_loss"),
              "decoder_lora_rank": ("mae", "decoder_lora_rank"), "centering": ("dinov2", "centering"),
              "num_prototypes": ("dinov2", "num_prototypes"), "local_crops": ("dinov2", "crops.n_local")}


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    p = subparsers.add_parser(
        "pretrain",
        help="ExPLoRA extended pre-training (MAE or DINOv2) of a ViT on unlabelled imagery",
        description="Continue the self-supervised pre-training of a ViT on your imagery with ExPLoRA: unfreeze a "
                    "few blocks, LoRA on Q and V elsewhere, same objective as the source model. Writes the merged "
                    "backbone, the adapter weights, a loss curve, summary.json, checkpoints and logs to --out. "
                    "Settings: --config FILE.yaml and/or flags (flags win).",
    )
    add_run_arguments(p)
    a = p.add_argument
    a("--search-steps", type=int, help="--unfreeze auto: steps of each candidate's trial in the block search "
                                       "(default a tenth of --max-steps)")
    p.set_defaults(func=run)


#: settings flags that only make sense for one run (``select-blocks`` leaves them out)
RUN_ONLY = ("--unfreeze", "--max-steps", "--resume", "--overwrite")


def add_run_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The settings flags of a pre-training run (shared by ``pretrain`` and ``select-blocks``), except
    ``skip``."""

    def a(flag: str, *args: Any, **kwargs: Any) -> None:
        if flag not in skip:
            p.add_argument(flag, *args, **kwargs)

    a("--config", metavar="FILE.yaml", help="YAML file with the same settings (keys as the flags, '_' for '-')")
    a("--data", nargs="+", metavar="PATH", help="rasters: folders, globs or files, or a store written by `explora-geo "
                                                "prepare` (a folder or s3:// gs:// r2:// URL) (default: the embedded "
                                                "sample)")
    a("--bands", help="sensor preset (sentinel2 -> group-channel ViT) or band names, comma-separated")
    a("--sensor", help="preset naming the files' bands (default: --bands when it is a preset, else sentinel2)")
    a("--model", help="timm / explora-geo model name (default per --bands and --objective)")
    a("--weights", help="source weights: 'random', a file, a timm pretrained name or a torchgeo weight name "
                        "(default: DINOv2 ViT-L/14 for dinov2, MAE ViT-L/16 for mae)")
    a("--objective", choices=["mae", "dinov2"], help="self-supervised objective (default mae)")
    a("--unfreeze", metavar="SPEC", help="blocks to unfreeze, paper notation: L, 1,L, L-1,L, none; or auto: choose "
      "them first by a block search (see select-blocks) (default L)")
    a("--rank", type=int, help="LoRA rank on Q,V of the frozen blocks (default 64)")
    a("--alpha", type=float, help="LoRA alpha; scale = alpha/rank (default 1)")
    a("--max-steps", type=int, help="optimiser steps (default 1000)")
    a("--batch-size", type=int, help="images per device per micro-batch (default 64)")
    a("--accumulate", type=int, help="micro-batches per optimiser step (default 1)")
    a("--lr", type=float, help="peak learning rate (default: the objective's recipe for the effective batch)")
    a("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of --max-steps)")
    a("--min-lr", type=float, help="learning rate at the end of the cosine (default 0)")
    a("--grad-clip", type=float, help="gradient-norm clipping, 0 = off (default 3)")
    a("--img-size", type=int, help="input size in px (default: the model's)")
    a("--patch-size", type=int, help="patch size in px (default: the model's)")
    a("--normalization", choices=["satmae", "meanstd", "reflectance", "none"],
      help="data scaling (default satmae)")
    a("--stats", metavar="JSON", help="band statistics from `explora-geo stats` for satmae/meanstd scaling "
                                      "(default: a store's own statistics with --data STORE, else the "
                                      "sensor's built-in ones)")
    a("--accelerator", help="cpu, gpu, auto (default auto)")
    a("--devices", type=_devices, help="devices per node: a number or 'auto' (default 1)")
    a("--num-nodes", type=int, help="nodes for multi-node DDP (default 1)")
    a("--strategy", help="Lightning strategy (default: ddp when several devices or nodes)")
    a("--precision", help="Lightning precision (default bf16-mixed on GPU, 32-true on CPU)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--workers", type=int, help="data-loading worker processes (default 0)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    a("--log-every", type=int, help="steps between log lines (default 10)")
    a("--max-nodata-fraction", type=float, help="redraw patches with more nodata than this (default 0.5)")
    a("--out", metavar="DIR", help="output folder (required, here or in the config)")
    a("--resume", nargs="?", const=True, metavar="CKPT",
      help="continue from DIR/checkpoints/last.ckpt, or from the given checkpoint")
    a("--overwrite", action="store_const", const=True,
      help="start afresh in an --out that already holds a run (deletes its checkpoints) or other files")
    a("--mask-ratio", type=float, help="MAE mask ratio (default 0.75)")
    a("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
      help="MAE: regress per-patch normalised pixels (default on, as MAE's released weights)")
    a("--decoder-lora-rank", type=int, help="MAE: LoRA rank of a loaded decoder (default 8)")
    a("--centering", choices=["softmax", "sinkhorn"], help="DINOv2 teacher centering (default softmax)")
    a("--num-prototypes", type=int, help="DINOv2 head prototypes (default 65536)")
    a("--local-crops", type=int, help="DINOv2 local crops (default 8)")


def load_config_file(path: str) -> dict[str, Any]:
    """The YAML mapping of ``path`` with ``-`` in keys turned into ``_``.

    Raises:
        ExploraGeoError: missing file, bad YAML, not a mapping.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ExploraGeoError(f"config file {path} does not exist; pass --config PATH to a YAML file.")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ExploraGeoError(f"config file {path} is not valid YAML ({first}); fix it.") from None
    if not isinstance(data, dict):
        raise ExploraGeoError(f"config file {path} must be a mapping of settings, got {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_settings(file_settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Config-file settings overridden by the flags that were given."""
    settings = dict(file_settings)
    for key in _FIELDS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    for key, (section, path) in _SHORTCUTS.items():
        value = getattr(args, key, None)
        if value is None:
            continue
        node = settings.setdefault(section, {}) or {}
        settings[section] = node = dict(node)
        *parents, leaf = path.split(".")
        for parent in parents:
            node[parent] = dict(node.get(parent) or {})
            node = node[parent]
        node[leaf] = value
    if isinstance(settings.get("data"), list) and len(settings["data"]) == 1:
        settings["data"] = settings["data"][0]
    return settings


def _rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    """Train and print one JSON line with the outputs and the headline numbers (rank 0)."""
    from explora_geo.training import PretrainConfig, run_pretraining

    file_settings = load_config_file(args.config) if args.config else {}
    settings = merge_settings(file_settings, args)
    if not settings.get("out"):
        raise ExploraGeoError("no output folder; pass --out DIR (or set out: in the config).")
    config = PretrainConfig.from_dict(settings, source=args.config or "the settings")

    def echo(message: str) -> None:
        if _rank_zero():
            print(message, file=sys.stderr, flush=True)

    if str(config.unfreeze).strip().lower() == "auto":
        from explora_geo.block_selection import pretrain_with_search

        summary = pretrain_with_search(config, echo=echo)
    else:
        summary = run_pretraining(config, echo=echo)
    if summary is not None:
        out = Path(config.out)
        keys = ("steps", "images_seen", "wall_time_s", "trainable_params", "total_params", "first_loss",
                "last_loss", "device")
        print(json.dumps({"out": str(out), "backbone": str(out / "backbone.safetensors"),
                          **{k: summary[k] for k in keys}}))
    return 0

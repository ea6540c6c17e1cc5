"""Build a tiny backbone file and a linear-probe head with the library (run with the library's ``.venv``).

Used by the plugin test session (``tests/plugin/conftest.py`` runs it, then ``explora-geo export``) and by
``tests/lib/test_export.py``. The backbone is a 2-block group-channel ViT over the Sentinel-2 preset's 10
bands, 32 px tiles of 8 px patches, at 10 m; the head is a 3-class probe on the last block's cls token.

Usage: ``python make_tiny_bundle.py OUT_DIR [--depth N --embed-dim D --num-heads H]`` ->
``OUT_DIR/backbone.{safetensors,json}`` and ``OUT_DIR/head.{safetensors,json}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

CLASSES = ["water", "vegetation", "built-up"]
COLORS = ["#1f78b4", "#33a02c", "#e31a1c"]
KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def build_backbone(out_dir: Path, seed: int = 0, **size: int) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json``; returns the ``.safetensors`` path.

    ``size`` overrides :data:`KWARGS` (``depth``, ``embed_dim``, ``num_heads``)."""
    import torch

    from explora_geo.checkpoint import save_backbone
    from explora_geo.models import create_backbone
    from explora_geo.normalization import Normalization
    from explora_geo.sensors import get_sensor

    torch.manual_seed(seed)
    kwargs = {**KWARGS, **size}
    model = create_backbone("group_channel_vit_tiny_patch8_96", bands="sentinel2", img_size=32, **kwargs)
    bands = get_sensor("sentinel2").model_bands
    sidecar = {"model_kwargs": {"img_size": 32, "sensor": "sentinel2", **kwargs}, "sensor": "sentinel2",
               "gsd_m": 10.0, "normalization": Normalization.for_sensor("sentinel2", bands, "satmae").to_dict(),
               "source_weights": None, "objective": "mae"}
    weights, _ = save_backbone(model, out_dir / "backbone", sidecar)
    return weights


def build_head(out_dir: Path, in_features: int = KWARGS["embed_dim"], seed: int = 1) -> Path:
    """Write a random 3-class probe head ``head.safetensors`` + ``head.json`` (feature set ``cls1``)."""
    import torch
    from torch import nn

    from explora_geo.downstream.probe import save_head

    torch.manual_seed(seed)
    head = nn.Linear(in_features, len(CLASSES))
    nn.init.normal_(head.weight, std=2.0)
    weights, _ = save_head(head, out_dir / "head", {"classes": CLASSES, "feature_set": "cls1",
                                                    "class_colors": COLORS})
    return weights


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="tiny backbone + probe head for the plugin tests")
    parser.add_argument("out_dir", type=Path)
    for name, value in KWARGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    size = {name: getattr(args, name) for name in KWARGS}
    print(build_backbone(args.out_dir, **size), build_head(args.out_dir, in_features=size["embed_dim"]))


if __name__ == "__main__":
    main(sys.argv[1:])

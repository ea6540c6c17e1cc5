"""Build a tiny backbone file and a linear-probe head with the library (run with the library's ``.venv``).

Used by the plugin test session (``tests/plugin/conftest.py`` runs it, then ``explora-geo export``) and by
``tests/lib/test_export.py``. The backbone is a 2-block group-channel ViT over the Sentinel-2 preset's 10
bands, 32 px tiles of 8 px patches, at 10 m; the head is a 3-class probe on the last block's cls token; the
segmenter is an ``ExploraSegmentationTask`` (LoRA, 2 classes + unlabelled 0) trained for a few steps by a
Lightning ``Trainer`` and saved by it, as ``torchgeo fit`` saves checkpoints.

Usage: ``python make_tiny_bundle.py OUT_DIR [--depth N --embed-dim D --num-heads H] [--segmenter]`` ->
``OUT_DIR/backbone.{safetensors,json}``, ``OUT_DIR/head.{safetensors,json}`` (and ``OUT_DIR/segmenter.ckpt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

CLASSES = ["water", "vegetation", "built-up"]
COLORS = ["#1f78b4", "#33a02c", "#e31a1c"]
KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}
SEG_CLASSES = ["water", "land"]  # mask values 1, 2; 0 = unlabelled (ignore_index)
SEG_COLORS = ["#1f78b4", "#b2df8a"]


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


def build_segmenter(out_dir: Path, backbone: Path, seed: int = 2, steps: int = 4) -> Path:
    """Train a tiny ``ExploraSegmentationTask`` (LoRA, decoder width 16) for ``steps`` steps on random tiles
    and save it with ``Trainer.save_checkpoint`` -> ``out_dir/segmenter.ckpt``. The LoRA factors start random
    (not peft's zero B), so merging them changes the backbone and an export that forgot them would differ."""
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from explora_geo.downstream.segmentation import ExploraSegmentationTask

    torch.manual_seed(seed)
    task = ExploraSegmentationTask(weights=str(backbone), num_classes=len(SEG_CLASSES) + 1, labels=SEG_CLASSES,
                                   ignore_index=0, mode="lora", n_blocks=2, decoder_dim=16, lr=0.01)
    task.hparams["class_colors"] = SEG_COLORS
    with torch.no_grad():
        for name, param in task.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    n_bands = len(task.hparams["backbone_meta"]["bands"])
    samples = [{"image": torch.rand(n_bands, 32, 32), "mask": torch.randint(0, 3, (32, 32))}
               for _ in range(2 * steps)]
    trainer = Trainer(max_epochs=1, limit_val_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=out_dir)
    trainer.fit(task, train_dataloaders=DataLoader(samples, batch_size=2),
                val_dataloaders=DataLoader(samples[:2], batch_size=2))
    path = out_dir / "segmenter.ckpt"
    trainer.save_checkpoint(path)
    return path


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="tiny backbone + probe head for the plugin tests")
    parser.add_argument("out_dir", type=Path)
    for name, value in KWARGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--segmenter", action="store_true", help="also train and save segmenter.ckpt")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    size = {name: getattr(args, name) for name in KWARGS}
    backbone = build_backbone(args.out_dir, **size)
    print(backbone, build_head(args.out_dir, in_features=size["embed_dim"]))
    if args.segmenter:
        print(build_segmenter(args.out_dir, backbone))


if __name__ == "__main__":
    main(sys.argv[1:])

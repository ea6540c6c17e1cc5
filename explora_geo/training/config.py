"""The settings of an ExPLoRA pre-training run (:class:`PretrainConfig`) and what follows from them alone
(world size, numeric precision)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from explora_geo.errors import ExploraGeoError

__all__ = ["PretrainConfig", "precision", "world_size"]


@dataclass
class PretrainConfig:
    """All settings of a pre-training run. Field names are the YAML keys and the CLI flags (``_`` -> ``-``).

    Args:
        out: output folder (checkpoints, logs, backbone, adapter, curve, summary).
        data: rasters to train on (folder, glob, file, or a list); ``None`` = the embedded T33UUU sample.
        bands: a sensor preset (``sentinel2`` -> the group-channel ViT on its groups) or band names
            (comma-separated or a list) for a plain timm ViT.
        sensor: preset naming the files' bands; default: ``bands`` when it is a preset, else ``sentinel2``.
        model: timm / explora-geo model name; default per ``bands`` and ``objective``.
        model_kwargs: extra ``create_model`` arguments (e.g. a tiny ``embed_dim``/``depth``/``num_heads``).
        weights: source weights (``random``, a file, a timm pretrained name, a torchgeo weight name);
            default per objective (DINOv2 ViT-L/14 or MAE ViT-L/16).
        objective: ``mae`` or ``dinov2``; ``mae`` / ``dinov2``: that objective's settings
            (:class:`~explora_geo.objectives.mae.MAEConfig`, :class:`~explora_geo.objectives.dinov2.DINOv2Config`).
        unfreeze, rank, alpha: ExPLoRA adapter (:class:`~explora_geo.adapter.ExploraConfig`).
        max_steps: optimiser steps. batch_size: images per device per micro-batch. accumulate: micro-batches
            per optimiser step.
        lr: peak learning rate; ``None`` = the objective's recipe for the effective batch.
        warmup_steps: linear warm-up steps; ``None`` = 5 % of ``max_steps``. min_lr: final cosine lr.
        grad_clip: gradient-norm clip (``None``/0 = off).
        img_size, patch_size: input size and patch size in px (default: the model's).
        normalization: ``satmae`` / ``meanstd`` / ``reflectance`` / ``none`` for the data.
        stats: a statistics JSON of ``explora-geo stats`` whose per-band mean/std replace the sensor's
            built-in ones for ``satmae`` / ``meanstd`` (needed for sensors without built-in statistics).
        accelerator, devices, num_nodes, strategy, precision: Lightning settings (precision default:
            ``bf16-mixed`` on GPU, ``32-true`` on CPU; strategy default: ``ddp`` when several devices/nodes).
        seed, workers, checkpoint_every, log_every: RNG seed, data workers, steps between checkpoints / logs.
        resume: continue from ``out/checkpoints/last.ckpt`` (``True``) or from a given checkpoint path.
        overwrite: start afresh in an ``out`` that already holds a run (its checkpoints are deleted; logs get a
            new version folder; the final outputs are replaced when the new run ends).
        max_nodata_fraction: patches with more nodata are redrawn.
        holdout, val_samples: fraction of every raster's rows (its bottom) kept out of training, and the number
            of held-out patches whose objective loss is measured (``val_loss``; 0 = no validation).
        val_every: optimiser steps between validations (``None``: once, at the end).
        search_steps, search_candidates: ``unfreeze: auto`` runs a block search first
            (:func:`explora_geo.block_selection.pretrain_with_search`): steps per candidate (default a tenth of
            ``max_steps``, at least 2) and the unfreeze specs tried (default: a set for the model's depth).
    """

    out: str = "runs/pretrain"
    data: Any = None
    bands: Any = "sentinel2"
    sensor: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    objective: str = "mae"
    mae: dict[str, Any] = field(default_factory=dict)
    dinov2: dict[str, Any] = field(default_factory=dict)
    unfreeze: Any = "L"
    rank: int = 64
    alpha: float = 1.0
    max_steps: int = 1000
    batch_size: int = 64
    accumulate: int = 1
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr: float = 0.0
    grad_clip: float | None = 3.0
    img_size: int | None = None
    patch_size: int | None = None
    normalization: str = "satmae"
    stats: str | None = None
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    resume: Any = False
    overwrite: bool = False
    max_nodata_fraction: float = 0.5
    holdout: float = 0.0
    val_samples: int = 0
    val_every: int | None = None
    search_steps: int | None = None
    search_candidates: list[str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "the config") -> PretrainConfig:
        """Build from a dict (YAML); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ExploraGeoError(f"{source} has unknown key(s) {', '.join(unknown)}; known keys: "
                                  f"{', '.join(sorted(known))}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def __post_init__(self) -> None:
        if self.objective not in ("mae", "dinov2"):
            raise ExploraGeoError(f"unknown objective {self.objective!r}; use --objective mae or dinov2.")
        for name in ("max_steps", "batch_size", "accumulate", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ExploraGeoError(f"{name} must be >= 1, got {getattr(self, name)}.")


def precision(config: PretrainConfig) -> str:
    """Lightning precision of the run: ``config.precision``, else ``bf16-mixed`` on GPU and ``32-true`` on CPU."""
    if config.precision:
        return config.precision
    gpu = config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def world_size(config: PretrainConfig) -> int:
    """Processes that train together (devices per node x nodes)."""
    devices = config.devices
    if isinstance(devices, int):
        n = devices if devices > 0 else max(torch.cuda.device_count(), 1)
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    else:
        n = max(torch.cuda.device_count(), 1)
    return n * int(config.num_nodes)

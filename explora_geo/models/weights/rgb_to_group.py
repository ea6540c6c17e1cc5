"""RGB or multi-band source kernels -> the model's patch-embedding kernels, by band name (group-channel ViTs
and multi-band timm ViTs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from explora_geo.errors import ExploraGeoError
from explora_geo.models.group_channel_vit import GroupChannelViT
from explora_geo.models.weights.report import SourceCheckpoint
from explora_geo.sensors import get_sensor, select_bands

__all__ = ["OtherKernels", "band_kernels", "channel_band_names", "infer_sensor", "rgb_to_group_kernels"]

OtherKernels = Literal["mean", "random"]


def band_kernels(
    weight: torch.Tensor,
    bands: Sequence[str],
    *,
    source_bands: Sequence[str],
    sensor: str | None,
    fresh: torch.Tensor,
    other_kernels: OtherKernels = "mean",
) -> tuple[torch.Tensor, str]:
    """Patch-embedding kernel for ``bands`` taken, by band name, from a source kernel.

    Args:
        weight: source kernel ``[D, C_src, p, p]`` (already at the model's patch size).
        bands: the target's input bands, e.g. one group ``["B02", "B03", "B04", "B08"]``.
        source_bands: names of the source's ``C_src`` channels, e.g. ``["B04", "B03", "B02"]`` for an RGB
            model (channel 0 = red), or the 13 names of a torchgeo Sentinel-2 model.
        sensor: preset whose aliases match band names (``None``: canonical ``B02``-style names only).
        fresh: the target's own initial kernel ``[D, len(bands), p, p]``, used by ``"random"``.
        other_kernels: for bands the source lacks: ``"mean"`` = the source kernel averaged over its channels,
            divided by ``len(bands)`` (so a group with no source band responds to a flat image with
            ``1 / C_src`` of the source stem's response per unit of input, spread evenly over its bands);
            ``"random"`` = keep ``fresh``.

    Returns:
        ``[D, len(bands), p, p]`` and a note ``"B02<-ch2 B08<-mean/4 ..."``.
    """
    mean_kernel = weight.mean(dim=1)
    chans, said = [], []
    for i, band in enumerate(bands):
        try:
            (src,) = select_bands(source_bands, [band], sensor=sensor)
        except ExploraGeoError:
            src = None
        if src is not None:
            chans.append(weight[:, src])
            said.append(f"{band}<-ch{src}")
        elif other_kernels == "mean":
            chans.append(mean_kernel / len(bands))
            said.append(f"{band}<-mean/{len(bands)}")
        else:
            chans.append(fresh[:, i])
            said.append(f"{band}<-random")
    return torch.stack(chans, dim=1), " ".join(said)


def rgb_to_group_kernels(
    weight: torch.Tensor,
    model: GroupChannelViT,
    *,
    source_bands: Sequence[str],
    sensor: str | None,
    other_kernels: OtherKernels = "mean",
) -> tuple[list[torch.Tensor], list[str]]:
    """Per-group patch-embedding kernels of ``model`` from a plain ViT's kernel (see :func:`band_kernels`).

    Returns:
        One ``[D, len(group), p, p]`` tensor per group, and a note per group saying what each band got.
    """
    kernels, notes = [], []
    for g, group in enumerate(model.band_groups):
        fresh = model.patch_embeds[g].proj.weight.detach()
        kernel, note = band_kernels(weight, group, source_bands=source_bands, sensor=sensor, fresh=fresh,
                                    other_kernels=other_kernels)
        kernels.append(kernel)
        notes.append(f"patch_embeds.{g}: {note}")
    return kernels, notes


def infer_sensor(bands: Sequence[str]) -> str | None:
    """The first sensor preset that knows every band name in ``bands`` (aliases allowed), else ``None``."""
    from explora_geo.sensors import SENSORS

    for name, sensor in SENSORS.items():
        if all(sensor.canonical(b) is not None for b in bands):
            return name
    return None


def channel_band_names(found: SourceCheckpoint, n_channels: int, sensor: str | None,
                  rgb_bands: Sequence[str] | None) -> list[str] | None:
    """Names of the source's input channels: from its metadata, else the RGB bands for 3 channels."""
    if found.bands is not None and len(found.bands) == n_channels:
        return list(found.bands)
    if n_channels == 3:
        rgb = list(rgb_bands or get_sensor(sensor or "sentinel2").rgb or ())
        if len(rgb) != 3:
            raise ExploraGeoError(f"sensor {sensor} has no RGB bands; pass rgb_bands=[red, green, blue].")
        return rgb
    return None

"""torchgeo weight names (``ViTSmall16_Weights.SENTINEL2_ALL_DINO``), through torch.hub's cache, with the
weights' bands and normalisation as metadata."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.models.weights.report import WEIGHTS_HINT, SourceCheckpoint
from explora_geo.models.weights.timm_hub import offline, reachable

__all__ = ["torchgeo_checkpoint"]


def torchgeo_checkpoint(name: str) -> SourceCheckpoint:
    """A torchgeo weight enum name, e.g. ``ViTSmall16_Weights.SENTINEL2_ALL_DINO``, through torch.hub's cache."""
    from torchgeo.models import get_weight

    try:
        weights = get_weight(name)
    except ValueError:
        raise ExploraGeoError(f"torchgeo has no weights called {name!r}; list them with "
                              "`torchgeo.models.list_models()` and their *_Weights enums.") from None
    meta: dict[str, Any] = {k: v for k, v in weights.meta.items() if isinstance(v, (str, int, float, list))}
    norm = _transform_normalization(weights.transforms)
    if norm is not None:
        meta["normalization"] = norm
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        if not cached.is_file() and (offline() or not reachable(weights.url)):
            raise ConnectionError(f"{weights.url} not reachable")
        raw = weights.get_state_dict(progress=True)  # torch.hub: reads the cached file, else downloads
    except Exception as err:  # noqa: BLE001 - offline / not cached / corrupt
        if cached.is_file():
            raise ExploraGeoError(f"cannot read torchgeo weights file {cached} ({type(err).__name__}); delete it "
                                  f"and download again, or {WEIGHTS_HINT}.") from err
        raise ExploraGeoError(
            f"torchgeo weights {name} are not cached at {cached} and cannot be downloaded "
            f"({type(err).__name__}); put the file there, or {WEIGHTS_HINT}."
        ) from err
    bands = [str(b) for b in meta["bands"]] if isinstance(meta.get("bands"), list) else None
    return SourceCheckpoint(raw, f"torchgeo {name}", meta, bands)


def _transform_normalization(transforms: Any) -> dict[str, list[float]] | None:
    """``mean``/``std`` of the first Normalize-like module in a torchgeo weights' transforms."""
    modules = transforms.modules() if isinstance(transforms, nn.Module) else ()
    for module in modules:
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if isinstance(mean, (torch.Tensor, list, tuple)) and isinstance(std, (torch.Tensor, list, tuple)):
            return {"mean": [float(v) for v in torch.as_tensor(mean).flatten()],
                    "std": [float(v) for v in torch.as_tensor(std).flatten()]}
    return None

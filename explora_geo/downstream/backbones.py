"""Backbone files as timm pretrained sources and torchgeo weights, loaded with a check.

A merged backbone (``<name>.safetensors`` + ``<name>.json`` sidecar, see ``docs/architecture.md``) becomes
usable by anything that builds models through timm's registry (``torchgeo.tasks.Classification``,
``torchgeo fit``) in two ways:

- :func:`register_backbone` registers a timm model NAME whose default pretrained config points at the file
  (``file=...``): ``timm.create_model(name, pretrained=True, num_classes=K)`` rebuilds the architecture with
  the sidecar's ``model_kwargs`` and loads the weights; ``pretrained_cfg_overlay=dict(file=other)`` swaps
  the file. So ``torchgeo.tasks.Classification(model=name, weights=True, ...)`` works unchanged.
- :func:`backbone_weights` gives a torchvision/torchgeo ``WeightsEnum`` entry whose ``meta`` carries the
  bands, normalisation and architecture and whose ``get_state_dict()`` reads the file.

Loading is always checked (:func:`explora_geo.checkpoint.load_backbone`): every backbone tensor must load
with a matching shape; only a new classifier head is fresh. Never a silent ``strict=False``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization

__all__ = [
    "backbone_model",
    "check_in_chans",
    "sidecar_normalization",
    "sidecar_img_size",
    "read_backbone_meta",
    "register_backbone",
    "backbone_weights",
]

# timm looks pretrained cfgs up in the registering module's ``default_cfgs``; register_backbone adds to it.
default_cfgs: dict[str, Any] = {}


def backbone_model(path: str | os.PathLike[str], *, num_classes: int = 0,
                   in_chans: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a backbone file (checked by :func:`explora_geo.checkpoint.load_backbone`).

    Returns ``(model, sidecar)`` with a fresh ``num_classes`` head; ``model.band_names`` is the input order.

    Raises:
        ExploraGeoError: bad file, or ``in_chans`` differing from the backbone's number of bands.
    """
    from explora_geo.checkpoint import load_backbone, read_sidecar

    sidecar = read_sidecar(path)
    check_in_chans(sidecar, in_chans)
    return load_backbone(path, num_classes=num_classes)


def check_in_chans(sidecar: Mapping[str, Any], in_chans: int | None) -> None:
    """Raise when a requested ``in_chans`` differs from the number of bands of the backbone."""
    bands = list(sidecar["bands"])
    if in_chans is not None and int(in_chans) != len(bands):
        raise ExploraGeoError(f"in_channels={in_chans} but the backbone takes {len(bands)} bands "
                              f"({', '.join(bands)}); set in_channels to {len(bands)}.")


def sidecar_normalization(sidecar: Mapping[str, Any]) -> Normalization | None:
    """The sidecar's :class:`Normalization` (``None`` when it has none)."""
    data = sidecar.get("normalization")
    return Normalization.from_dict(dict(data)) if data else None


def sidecar_img_size(sidecar: Mapping[str, Any]) -> int | None:
    """The backbone's input side in pixels (the first of an ``[h, w]`` size); ``None`` when it has none."""
    size = sidecar.get("img_size")
    if not size:
        return None
    return int(size if isinstance(size, int) else size[0])


# --------------------------------------------------------------------------------------------------------
# timm registry
# --------------------------------------------------------------------------------------------------------

def _model_name(path: Path) -> str:
    stem = re.sub(r"\W+", "_", path.with_suffix("").name).strip("_").lower() or "backbone"
    return f"explora_{stem}"


def read_backbone_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated sidecar plus ``weights_file`` (absolute path of the ``.safetensors``)."""
    from explora_geo.checkpoint import read_backbone_files

    weights, meta = read_backbone_files(path)
    meta["weights_file"] = str(weights.resolve())
    return meta


def register_backbone(path: str | os.PathLike[str], name: str | None = None) -> str:
    """Register a backbone file with timm; returns the model name (default ``explora_<file stem>``).

    ``timm.create_model(name, pretrained=True, num_classes=K, in_chans=C)`` then builds the sidecar's
    architecture and loads the file, checked by :func:`explora_geo.checkpoint.load_backbone` (every backbone
    key must match; only the new head is fresh). ``pretrained=False`` gives the same architecture, randomly
    initialised; ``pretrained_cfg_overlay=dict(file=other.safetensors)`` loads another backbone file of the
    same architecture and bands. The name has one pretrained tag, ``<name>.explora``. Re-registering a name
    replaces it.

    Raises:
        ExploraGeoError: bad backbone file or a name that is not an identifier.
    """
    import warnings

    import timm
    from timm.models import register_model

    meta = read_backbone_meta(path)
    name = name or _model_name(Path(meta["weights_file"]))
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ExploraGeoError(f"model name {name!r} must be a Python identifier (letters, digits, _).")
    size = meta["img_size"] if isinstance(meta["img_size"], list) else [meta["img_size"]] * 2
    n_bands = len(meta["bands"])
    default_cfgs[name] = timm.models.generate_default_cfgs({f"{name}.explora": {
        "file": meta["weights_file"],
        "num_classes": 0,
        "input_size": (n_bands, *size),
        "mean": (0.0,) * n_bands,  # inputs are scaled by the sidecar normalisation, not by timm
        "std": (1.0,) * n_bands,
        "crop_pct": 1.0,
        "first_conv": None,
        "classifier": "head",
        "description": f"explora-geo backbone {Path(meta['weights_file']).name} "
                       f"({meta['architecture']}, bands {','.join(meta['bands'])})",
    }})[name]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from timm.models import resolve_pretrained_cfg

        from explora_geo.checkpoint import build_from_sidecar, load_backbone

        cfg = resolve_pretrained_cfg(name, kwargs.pop("pretrained_cfg", None),
                                     kwargs.pop("pretrained_cfg_overlay", None))
        kwargs.pop("cache_dir", None)
        num_classes = int(kwargs.pop("num_classes", 0) or 0)
        check_in_chans(meta, kwargs.pop("in_chans", None))
        if kwargs:
            raise ExploraGeoError(f"timm model {name} is fixed by its sidecar; it takes no {', '.join(kwargs)}.")
        if pretrained:
            model, other = load_backbone(cfg.file or meta["weights_file"], num_classes=num_classes)
            keys = ("architecture", "model_kwargs", "bands")
            if [other[k] for k in keys] != [meta[k] for k in keys]:
                raise ExploraGeoError(
                    f"pretrained file {cfg.file} is a {other['architecture']} {other['model_kwargs']} on bands "
                    f"{','.join(other['bands'])}, not the {meta['architecture']} {meta['model_kwargs']} on "
                    f"{','.join(meta['bands'])} that {name} is; register it under its own name."
                )
        else:
            model = build_from_sidecar(meta, num_classes=num_classes)
        model.pretrained_cfg = cfg.to_dict()
        model.explora_sidecar = dict(meta)
        return model

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"explora-geo backbone from {meta['weights_file']}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overwriting")
        register_model(entrypoint)
    return name


# --------------------------------------------------------------------------------------------------------
# torchgeo / torchvision weights entries
# --------------------------------------------------------------------------------------------------------

def _weights_enum_base() -> type:
    from torchvision.models._api import WeightsEnum

    class _Base(WeightsEnum):
        """A ``WeightsEnum`` whose entries are local explora-geo backbone files."""

        def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            from safetensors.torch import load_file

            return load_file(self.value.meta["weights_file"])

    return _Base


def backbone_weights(path: str | os.PathLike[str], name: str | None = None) -> Any:
    """A torchgeo-style weights entry (torchvision ``WeightsEnum`` member) for a backbone file.

    ``entry.meta`` is the sidecar (``bands``, ``normalization``, ``architecture``, ``model_kwargs``, ...)
    plus ``weights_file``; ``entry.transforms`` is the sidecar :class:`Normalization` (or ``None``);
    ``entry.get_state_dict()`` reads the safetensors file. As ``weights=`` of
    :class:`explora_geo.downstream.tasks.ExploraClassificationTask` it is loaded with a check; torchgeo's own
    tasks load it with their non-strict loader, so prefer :func:`register_backbone` there.
    """
    from torchvision.models._api import Weights

    meta = read_backbone_meta(path)
    member = (name or _model_name(Path(meta["weights_file"]))).upper()
    enum_cls = _weights_enum_base()(
        "ExploraBackboneWeights",
        {member: Weights(url=Path(meta["weights_file"]).as_uri(), transforms=sidecar_normalization(meta),
                         meta=meta)},
    )
    return enum_cls[member]

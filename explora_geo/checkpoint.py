"""Backbone files: ``<name>.safetensors`` (weights) + ``<name>.json`` (sidecar), the hand-off between
pre-training, downstream tasks and export.

The weights are a plain, merged backbone (fused ``qkv``, no LoRA keys, no classification head) that loads
with ``strict=True`` into the timm architecture named in the sidecar. The sidecar says how to rebuild and
feed it; its schema and validation live in :mod:`explora_geo.sidecar` (and ``docs/architecture.md``).

Both files are written to temporary names in the destination folder and moved into place with
``os.replace``, so a failure never leaves a half-written backbone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explora_geo.adapter import ExploraConfig, _few, merged_state_dict
from explora_geo.atomic import atomic_paths
from explora_geo.errors import ExploraGeoError
from explora_geo.sidecar import (
    FORMAT,
    FORMAT_VERSION,
    backbone_paths,
    read_backbone_files,
    read_sidecar,
    validate_sidecar,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "save_backbone", "load_backbone", "read_sidecar", "validate_sidecar",
           "build_from_sidecar", "backbone_paths", "read_backbone_files"]

# --------------------------------------------------------------------------------------------------------
# Sidecar fields of a model
# --------------------------------------------------------------------------------------------------------

def _model_facts(model: nn.Module) -> dict[str, Any]:
    """Sidecar fields read off a timm-style model (only those it knows)."""
    facts: dict[str, Any] = {}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        facts["architecture"] = arch
    patch_embed = getattr(model, "patch_embed", None)
    img = getattr(model, "img_size", None) or getattr(patch_embed, "img_size", None)
    patch = getattr(model, "patch_size", None) or getattr(patch_embed, "patch_size", None)
    if img is not None:
        img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
        facts["img_size"] = int(img[0]) if img[0] == img[1] else [int(v) for v in img]
    if patch is not None:
        facts["patch_size"] = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if dim is not None:
        facts["embed_dim"] = int(dim)
    if getattr(model, "band_names", None) is not None:
        facts["bands"] = list(model.band_names)
    if getattr(model, "band_groups", None) is not None:
        facts["band_groups"] = [list(g) for g in model.band_groups]
    config = getattr(model, "explora_config", None)
    if isinstance(config, ExploraConfig):
        facts["explora"] = config.to_dict()
    return facts


# --------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------

def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classification head (``get_classifier()``), if the model has one."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return ()
    return tuple(f"{name}." for name, module in model.named_modules() if module is head and name)


def save_backbone(
    model: nn.Module, path: str | os.PathLike[str], sidecar: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``model``'s backbone to ``<path>.safetensors`` and its sidecar to ``<path>.json``, atomically.

    An ExPLoRA-adapted model is merged on the fly (:func:`explora_geo.adapter.merged_state_dict`; the model is
    not changed). The classification head is not saved (a backbone file is an encoder). Sidecar fields the
    model knows (``architecture`` from timm's ``pretrained_cfg``, ``img_size``, ``patch_size``, ``embed_dim``,
    ``bands``/``band_groups`` of group-channel ViTs or ``create_backbone``, ``explora`` from
    ``apply_explora``) are filled in; ``sidecar`` overrides them and adds the rest (``model_kwargs`` needed
    to rebuild a non-default variant, ``sensor``, ``gsd_m``, ``normalization``, ``source_weights``,
    ``objective``).

    Args:
        model: a timm-style ViT (adapted or not), on any device.
        path: destination without suffix (a ``.safetensors``/``.json`` suffix is dropped).
        sidecar: sidecar fields (see the module docstring).

    Returns:
        ``(weights_path, sidecar_path)``.

    Raises:
        ExploraGeoError: a required sidecar field is missing or invalid, or ``architecture`` +
            ``model_kwargs`` do not rebuild a model with these keys and shapes (checked on the meta device);
            nothing is written then.
    """
    weights_path, json_path = backbone_paths(path)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **_model_facts(model), **dict(sidecar or {})}
    data["model_kwargs"] = {k: v for k, v in dict(data.get("model_kwargs") or {}).items() if k != "num_classes"}
    data = validate_sidecar(data, source=f"sidecar for {json_path}")
    heads = _head_prefixes(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in merged_state_dict(model).items()
               if not k.startswith(heads)}
    with torch.device("meta"):  # the architecture only: check that the sidecar rebuilds this model
        rebuilt = build_from_sidecar(data)
    problem = _mismatch(rebuilt.state_dict(), tensors, _head_prefixes(rebuilt))
    if problem:
        raise ExploraGeoError(f"the sidecar for {json_path} does not rebuild this model ({problem}); pass the "
                              "timm.create_model kwargs that built it as sidecar['model_kwargs'].")
    text = json.dumps(data, indent=2)
    from safetensors.torch import save_file

    with atomic_paths(weights_path, json_path) as (tmp_weights, tmp_json):
        save_file(tensors, tmp_weights, metadata={"format": "pt", "explora_geo_sidecar": json.dumps(data)})
        tmp_json.write_text(text, encoding="utf-8")
    return weights_path, json_path


def _mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
              heads: tuple[str, ...]) -> str:
    """How ``state`` differs from ``expected`` (keys and shapes; a head may be absent); ``""`` if it fits."""
    missing = sorted(k for k in expected if k not in state and not k.startswith(heads))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    return "; ".join(f"{label}: {_few(keys)}" for label, keys in
                     (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys)


def build_from_sidecar(sidecar: Mapping[str, Any], *, num_classes: int = 0) -> nn.Module:
    """The (randomly initialised) architecture a sidecar describes, through timm's registry.

    Raises:
        ExploraGeoError: the architecture is not registered (names it).
    """
    import timm

    import explora_geo.models  # noqa: F401  (registers the group_channel_vit_* names with timm)

    arch = sidecar["architecture"]
    if not timm.is_model(arch):
        raise ExploraGeoError(f"backbone architecture {arch!r} is not a registered timm model; install the "
                              "timm/explora-geo version that wrote it.")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **sidecar["model_kwargs"])
    except TypeError as err:
        raise ExploraGeoError(f"model_kwargs {sidecar['model_kwargs']} do not fit {arch} ({err}); pass the "
                              "timm.create_model keyword arguments of that architecture.") from err
    if getattr(model, "band_names", None) is None:
        model.band_names = list(sidecar["bands"])
    return model


def load_backbone(path: str | os.PathLike[str], *, num_classes: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the backbone saved at ``path`` and load its weights (strict: every key must match).

    Args:
        path: the backbone's stem, ``.safetensors`` or ``.json`` path.
        num_classes: outputs of a fresh classification head (0: none, ``forward`` gives features). The head
            is the only part allowed to be absent from the file.

    Returns:
        ``(model, sidecar)``: the model on CPU in train mode, all parameters trainable, with ``band_names``;
        the validated sidecar dict.

    Raises:
        ExploraGeoError: missing/corrupt file, invalid sidecar, or weights that do not match the architecture
            (names the file and the offending keys).
    """
    weights_path, sidecar = read_backbone_files(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ExploraGeoError(f"backbone weights {weights_path} are corrupt or unreadable ({err}); "
                              "re-save or re-copy the backbone.") from err
    model = build_from_sidecar(sidecar, num_classes=num_classes)
    expected = model.state_dict()
    problem = _mismatch(expected, state, _head_prefixes(model))
    if problem:
        raise ExploraGeoError(f"backbone weights {weights_path} do not match architecture "
                              f"{sidecar['architecture']} ({problem}); fix the sidecar's "
                              "architecture/model_kwargs or re-save the backbone.")
    with torch.no_grad():
        model.load_state_dict({**{k: v for k, v in expected.items() if k not in state}, **state}, strict=True)
    return model, sidecar

"""Backbone files: ``<name>.safetensors`` (weights) + ``<name>.json`` (sidecar), the hand-off between
pre-training, downstream tasks and export.

The weights are a plain, merged backbone (fused ``qkv``, no LoRA keys, no classification head) that loads
with ``strict=True`` into the timm architecture named in the sidecar. The sidecar says how to rebuild and
feed it (schema in ``docs/architecture.md``)::

    {"format": "explora-geo-backbone", "format_version": 1,
     "architecture": "<timm registered name>", "model_kwargs": {...},
     "bands": [...], "band_groups": [[...], ...] | null, "sensor": "sentinel2" | null,
     "gsd_m": 10.0 | null, "img_size": 96, "patch_size": 8, "embed_dim": 192,
     "normalization": Normalization.to_dict() | null,
     "source_weights": "<spec>" | null, "explora": ExploraConfig.to_dict() | null,
     "objective": "mae" | "dinov2" | null}

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
from explora_geo.normalization import Normalization

__all__ = ["FORMAT", "FORMAT_VERSION", "save_backbone", "load_backbone", "read_sidecar", "validate_sidecar",
           "build_from_sidecar", "backbone_paths", "read_backbone_files"]

FORMAT = "explora-geo-backbone"
FORMAT_VERSION = 1
OBJECTIVES = ("mae", "dinov2")
_REQUIRED = ("architecture", "bands", "img_size", "patch_size", "embed_dim")
_DEFAULTS: dict[str, Any] = {
    "model_kwargs": {}, "band_groups": None, "sensor": None, "gsd_m": None, "normalization": None,
    "source_weights": None, "explora": None, "objective": None,
}
_KEYS = {"format", "format_version", *_REQUIRED, *_DEFAULTS}


def backbone_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights, sidecar)`` paths for ``path`` given with or without ``.safetensors`` / ``.json``."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def read_backbone_files(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The backbone's weights path (checked to exist) and its validated sidecar."""
    weights_path, _ = backbone_paths(path)
    sidecar = read_sidecar(path)
    if not weights_path.is_file():
        raise ExploraGeoError(f"backbone weights {weights_path} do not exist; the .safetensors must lie beside "
                              "its .json sidecar.")
    return weights_path, sidecar


# --------------------------------------------------------------------------------------------------------
# Sidecar
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


def _expect(ok: bool, source: str, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ExploraGeoError(f"{source}: sidecar field {key!r} must be {what}, got {value!r}; "
                              "rewrite the backbone with explora_geo.checkpoint.save_backbone.")


def validate_sidecar(data: Mapping[str, Any], *, source: str = "the sidecar") -> dict[str, Any]:
    """Check a sidecar dict against the schema; returns a copy with optional fields filled with defaults.

    Raises:
        ExploraGeoError: naming ``source`` and the first bad or missing field.
    """
    if not isinstance(data, Mapping):
        raise ExploraGeoError(f"{source} is not a JSON object; pass the .json written beside a backbone.")
    if data.get("format") != FORMAT:
        raise ExploraGeoError(f"{source} is not an explora-geo backbone sidecar (format {data.get('format')!r}, "
                              f"expected {FORMAT!r}); pass a file written by save_backbone.")
    if data.get("format_version") != FORMAT_VERSION:
        raise ExploraGeoError(f"{source} has format_version {data.get('format_version')!r}; this explora-geo "
                              f"reads version {FORMAT_VERSION}: upgrade explora-geo or re-save the backbone.")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ExploraGeoError(f"{source} has unknown sidecar fields {unknown}; expected only {sorted(_KEYS)}.")
    missing = [k for k in _REQUIRED if data.get(k) is None]
    if missing:
        raise ExploraGeoError(f"{source} lacks sidecar field(s) {', '.join(missing)}; pass them in the sidecar.")
    out = {**_DEFAULTS, **data}
    out["model_kwargs"] = dict(out["model_kwargs"] or {})
    size = out["img_size"]
    _expect(isinstance(out["architecture"], str), source, "architecture", "a timm model name", out["architecture"])
    bands = out["bands"]
    _expect(isinstance(bands, list) and bool(bands) and all(isinstance(b, str) for b in bands), source, "bands",
            "a non-empty list of band names", bands)
    groups = out["band_groups"]
    _expect(groups is None or (isinstance(groups, list) and [b for g in groups for b in g] == out["bands"]),
            source, "band_groups", "null or groups whose concatenation equals 'bands'", groups)
    _expect((isinstance(size, int) and size > 0) or (isinstance(size, list) and len(size) == 2), source,
            "img_size", "a positive integer (or [h, w])", size)
    for key in ("patch_size", "embed_dim"):
        _expect(isinstance(out[key], int) and out[key] > 0, source, key, "a positive integer", out[key])
    _expect(out["gsd_m"] is None or (isinstance(out["gsd_m"], (int, float)) and out["gsd_m"] > 0), source,
            "gsd_m", "null or a positive number of metres", out["gsd_m"])
    _expect(out["objective"] in (None, *OBJECTIVES), source, "objective", f"null or one of {OBJECTIVES}",
            out["objective"])
    for key in ("sensor", "source_weights"):
        _expect(out[key] is None or isinstance(out[key], str), source, key, "null or a string", out[key])
    _expect("num_classes" not in out["model_kwargs"], source, "model_kwargs", "free of num_classes",
            out["model_kwargs"])
    if isinstance(out["normalization"], Normalization):
        out["normalization"] = out["normalization"].to_dict()
    if out["normalization"] is not None:
        Normalization.from_dict(out["normalization"])
    if isinstance(out["explora"], ExploraConfig):
        out["explora"] = out["explora"].to_dict()
    if out["explora"] is not None:
        ExploraConfig.from_dict(out["explora"])
    return out


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated sidecar of the backbone at ``path`` (stem, ``.json`` or ``.safetensors``).

    Raises:
        ExploraGeoError: missing file, invalid JSON, or a field that breaks the schema (names the file).
    """
    _, json_path = backbone_paths(path)
    if not json_path.is_file():
        raise ExploraGeoError(f"backbone sidecar {json_path} does not exist; pass the path of a backbone "
                              "written by explora-geo (its .safetensors and .json lie side by side).")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExploraGeoError(
            f"backbone sidecar {json_path} is not valid JSON ({err}); re-save the backbone."
        ) from err
    return validate_sidecar(data, source=str(json_path))


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

"""The backbone sidecar: the JSON file beside a backbone's weights that says how to rebuild and feed it.

Schema (fields in ``docs/architecture.md``)::

    {"format": "explora-geo-backbone", "format_version": 1,
     "architecture": "<timm registered name>", "model_kwargs": {...},
     "bands": [...], "band_groups": [[...], ...] | null, "sensor": "sentinel2" | null,
     "gsd_m": 10.0 | null, "img_size": 96, "patch_size": 8, "embed_dim": 192,
     "normalization": Normalization.to_dict() | null,
     "source_weights": "<spec>" | null, "explora": ExploraConfig.to_dict() | null,
     "objective": "mae" | "dinov2" | null}

This module reads and validates sidecars and builds no model, so that :mod:`explora_geo.models` (which reads
the sidecar beside a source-weights file) and :mod:`explora_geo.checkpoint` (which saves and loads whole
backbones through :mod:`explora_geo.models`) both import it without importing each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from explora_geo.adapter import ExploraConfig
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization

__all__ = ["FORMAT", "FORMAT_VERSION", "OBJECTIVES", "backbone_paths", "read_backbone_files", "read_sidecar",
           "validate_sidecar"]

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

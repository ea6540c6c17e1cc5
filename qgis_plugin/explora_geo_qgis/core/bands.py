"""Which layer band feeds which model band.

Automatic mapping matches the model's band names against the layer's band names/descriptions with the same
normalisation as the library's ``explora_geo.sensors.canonical_band_name`` (``b2``, ``B2``, ``band_2`` and
``B02`` are one band; ``b8a`` is ``B8A``). When none of the layer's bands carries a model band's name the
mapping falls back to position, but only when the layer has exactly as many bands as the model. A user
mapping (some or all bands) overrides both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import PluginError

_BAND_NUMBER = re.compile(r"^(?:b|band)[\s_-]?0*(\d{1,2})([a-z]?)$")
_GENERIC = re.compile(r"^band\s*\d+$", re.IGNORECASE)


def canonical_band_name(name: str) -> str:
    """Normalise a band label: ``"b2"`` and ``"band_2"`` become ``"B02"``, ``"b8a"`` becomes ``"B8A"``;
    other labels are returned stripped and upper-cased."""
    folded = name.strip().lower()
    match = _BAND_NUMBER.match(folded)
    if match is None:
        return folded.upper()
    number, suffix = match.groups()
    return f"B{int(number)}{suffix.upper()}" if suffix else f"B{int(number):02d}"


def layer_band_label(generated_name: str) -> str:
    """The description part of a QGIS band name: ``"Band 02: B02"`` -> ``"B02"``; ``"Band 2"`` -> ``""``."""
    _, sep, desc = generated_name.partition(":")
    if sep:
        return desc.strip()
    return "" if _GENERIC.match(generated_name.strip()) else generated_name.strip()


def parse_mapping(text: str, model_bands: Sequence[str]) -> dict[str, int]:
    """Parse a user band mapping ``"B02=2, B03=3, ..."`` (model band = 1-based layer band number).

    Returns:
        model band name (as the model spells it) -> 1-based layer band number.
    """
    known = {canonical_band_name(b): b for b in model_bands}
    mapping: dict[str, int] = {}
    for item in (part.strip() for part in text.replace(";", ",").split(",")):
        if not item:
            continue
        name, sep, number = item.partition("=")
        model_name = known.get(canonical_band_name(name))
        if not sep or model_name is None or not number.strip().isdigit() or int(number) < 1:
            raise PluginError(
                f"band mapping item {item!r} is not MODEL_BAND=LAYER_BAND_NUMBER with a model band among "
                f"{', '.join(model_bands)}; write e.g. '{model_bands[0]}=1'."
            )
        mapping[model_name] = int(number)
    return mapping


def resolve_bands(
    model_bands: Sequence[str],
    layer_labels: Sequence[str],
    override: dict[str, int] | None = None,
    *,
    source: str = "the layer",
) -> list[int]:
    """1-based layer band numbers feeding the model's bands, in model order.

    Args:
        model_bands: the model's input bands, in input order.
        layer_labels: one label per layer band ('' when the band has no name/description).
        override: model band -> 1-based layer band, from :func:`parse_mapping`; wins over names.
        source: the layer's name, for messages.

    Raises:
        PluginError: naming every model band that cannot be found, or a mapped band number out of range.
    """
    override = override or {}
    n_layer = len(layer_labels)
    for name, number in override.items():
        if number > n_layer:
            raise PluginError(f"band mapping {name}={number} is out of range: {source} has {n_layer} band(s).")
    positions: dict[str, int] = {}
    for i, label in enumerate(layer_labels, start=1):
        if label:
            positions.setdefault(canonical_band_name(label), i)
    named = any(canonical_band_name(b) in positions for b in model_bands)
    if not named and n_layer == len(model_bands):
        # unnamed bands, as many as the model's: by position (the override still wins)
        positions = {canonical_band_name(b): i for i, b in enumerate(model_bands, start=1)}
    result: list[int] = []
    missing: list[str] = []
    for band in model_bands:
        number = override.get(band) or positions.get(canonical_band_name(band))
        if number is None:
            missing.append(band)
        else:
            result.append(number)
    if missing:
        have = ", ".join(label or f"band {i}" for i, label in enumerate(layer_labels, start=1)) or "no bands"
        raise PluginError(
            f"{source} lacks band(s) {', '.join(missing)} needed by the model (it has {have}); use a raster "
            "with these bands, name its bands, or map them with the band mapping parameter (e.g. 'B02=1')."
        )
    return result

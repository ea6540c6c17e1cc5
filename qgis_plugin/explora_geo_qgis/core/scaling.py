"""Input scaling in numpy, from the ``normalization`` entry of an exported model's metadata.

The formulas are those of ``explora_geo.normalization.Normalization`` (the library); the plugin cannot import
the library (it must not need torch), so they are re-stated here and a parity test in the library's suite
(``tests/lib/test_export.py``) checks both give the same numbers.

Schemes, per band, after subtracting ``offset`` (digital numbers):

- ``reflectance``: ``x / divide``;
- ``meanstd``: ``(x - mean) / std``;
- ``satmae``: clip to ``[mean - 2 std, mean + 2 std]``, then map that range to ``[0, 1]``;
- ``none``: identity.

Users' rasters are not always in the units the model was trained on (0-1 reflectance for a model of digital
numbers, percent, ...). An optional input transform ``value * scale + offset`` (the algorithms' ``SCALE`` and
``OFFSET``) is folded into the per-band constants, so it costs nothing per pixel, and :func:`check_value_scale`
compares a sample of the layer's valid pixels with the level the normalisation expects and refuses a clear
mismatch with the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PluginError

SCHEMES = ("reflectance", "meanstd", "satmae", "none")
#: a typical surface reflectance (0-1), for the level a ``reflectance`` model expects
TYPICAL_REFLECTANCE = 0.2
#: a sample whose median is this many orders of magnitude off the expected level is refused
MISMATCH_DECADES = 1.5


@dataclass(frozen=True)
class Scaler:
    """Vectorised per-band scaling of ``[..., C, H, W]`` arrays to float32.

    Attributes:
        scheme: one of :data:`SCHEMES`.
        bands: band names, in channel order.
        sub: per-band value subtracted first, shape ``[C]`` (offset, plus ``mean`` or the clip low end).
        mul: per-band factor applied after subtracting, shape ``[C]``.
        low, high: per-band clip range in digital numbers (``satmae`` only), shape ``[C]``.
        level: per-band typical input value the normalisation expects (``offset + mean``, or
            ``offset + 0.2 * divide`` for ``reflectance``), shape ``[C]``; ``None`` for ``none``.
        offset: the normalisation's per-band ``offset`` (digital numbers), shape ``[C]``.
    """

    scheme: str
    bands: tuple[str, ...]
    sub: np.ndarray
    mul: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    level: np.ndarray | None = None
    offset: np.ndarray | None = None

    @classmethod
    def from_dict(cls, norm: Mapping[str, Any]) -> Scaler:
        """Build from ``Normalization.to_dict()`` (keys scheme, bands, offset, divide, mean, std)."""
        scheme = norm.get("scheme")
        if scheme not in SCHEMES:
            raise PluginError(f"model metadata has unknown normalisation scheme {scheme!r}; "
                              f"re-export the model with explora-geo (schemes: {', '.join(SCHEMES)}).")
        bands = tuple(str(b) for b in norm.get("bands") or ())
        n = len(bands)
        offset = _per_band(norm.get("offset"), n, "offset", default=0.0)
        if scheme == "reflectance":
            divide = float(norm.get("divide", 10000.0))
            return cls(scheme, bands, offset, np.full(n, 1.0 / divide),
                       level=offset + TYPICAL_REFLECTANCE * divide, offset=offset)
        if scheme == "none":
            return cls(scheme, bands, offset, np.ones(n), offset=offset)
        mean = _per_band(norm.get("mean"), n, "mean")
        std = _per_band(norm.get("std"), n, "std")
        if scheme == "meanstd":
            return cls(scheme, bands, offset + mean, 1.0 / std, level=offset + mean, offset=offset)
        low, high = mean - 2 * std, mean + 2 * std
        return cls(scheme, bands, offset + low, 1.0 / (high - low), low=offset + low, high=offset + high,
                   level=offset + mean, offset=offset)

    def select(self, order: Sequence[int]) -> Scaler:
        """The same scaling for the bands at positions ``order`` (reordering or picking bands)."""
        idx = list(order)

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Scaler(self.scheme, tuple(self.bands[i] for i in idx), self.sub[idx], self.mul[idx],
                      pick(self.low), pick(self.high), pick(self.level), pick(self.offset))

    def with_input(self, scale: float = 1.0, offset: float = 0.0) -> Scaler:
        """The scaling of ``value * scale + offset`` (the user's ``SCALE`` / ``OFFSET``) folded into the constants:
        ``(v * s + o - sub) * mul == (v - (sub - o) / s) * (s * mul)``, and the clip range likewise.

        Raises:
            PluginError: when ``scale`` is not a positive finite number.
        """
        if not (math.isfinite(scale) and scale > 0) or not math.isfinite(offset):
            raise PluginError(f"SCALE {scale:g} / OFFSET {offset:g}: SCALE must be a positive number and OFFSET "
                              "finite; e.g. SCALE=10000 for 0-1 reflectance given to a model of digital numbers.")
        if scale == 1.0 and offset == 0.0:
            return self

        def raw(a: np.ndarray | None) -> np.ndarray | None:  # a model-unit value -> the layer value giving it
            return None if a is None else (a - offset) / scale

        return Scaler(self.scheme, self.bands, raw(self.sub), self.mul * scale, raw(self.low), raw(self.high),
                      self.level, self.offset)

    def __call__(self, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Scale ``x`` of shape ``[..., C, H, W]`` (any numeric dtype, any strides) to a C-contiguous float32
        array (gathering strided tile views in the same pass).

        Args:
            x: digital numbers, channels in :attr:`bands` order.
            out: optional float32 array of ``x``'s shape to write into (``x`` itself if it is float32).
        """
        if x.shape[-3] != len(self.bands):
            raise PluginError(f"scaling expects {len(self.bands)} bands ({', '.join(self.bands)}), "
                              f"got {x.shape[-3]}.")
        col = (slice(None), None, None)
        y = np.subtract(x, self.sub.astype(np.float32)[col], out=out, dtype=np.float32, order="C")
        if self.low is not None and self.high is not None:
            # clip(x - low, 0, high - low) (sub == low): two ufuncs instead of np.clip, whose array-bounds path
            # (numpy 1.24) made this whole call ~4x slower (same results)
            np.maximum(y, np.float32(0.0), out=y)
            np.minimum(y, (self.high - self.low).astype(np.float32)[col], out=y)
        np.multiply(y, self.mul.astype(np.float32)[col], out=y)
        return y


def check_value_scale(sample: np.ndarray, scaler: Scaler, *, scale: float = 1.0, offset: float = 0.0,
                      source: str = "the layer") -> str:
    """Compare the layer's values with the level the model's normalisation expects; refuse a clear mismatch.

    Args:
        sample: ``[C, N]`` valid pixel values of the layer (model band order, before ``scale``/``offset``).
        scaler: the model's scaling (without the user's input transform).
        scale, offset: the user's ``value * scale + offset``.
        source: the layer's name, for messages.

    Returns:
        one log line saying what was checked.

    Raises:
        PluginError: when the per-band medians are, on the median band, more than :data:`MISMATCH_DECADES`
            orders of magnitude from the expected levels; the message gives the ``SCALE``/``OFFSET`` that fixes it.
    """
    if scaler.level is None:
        return f"Value scale not checked: the model's normalisation ({scaler.scheme}) gives no expected level."
    if sample.shape[1] == 0:
        return "Value scale not checked: no valid pixel in the sample."
    values = sample * scale + offset
    medians = np.median(values, axis=1)
    level = scaler.level
    usable = (np.abs(medians) > 0) & (np.abs(level) > 0)
    if not usable.any():
        return "Value scale not checked: the sampled bands are all zero."
    decades = float(np.median(np.log10(np.abs(medians[usable]) / np.abs(level[usable]))))
    detail = (f"median {_fmt(np.median(medians[usable]))} vs about {_fmt(np.median(level[usable]))} expected "
              f"by the model's {scaler.scheme} normalisation, over {sample.shape[1]} sampled pixels")
    if abs(decades) <= MISMATCH_DECADES:
        return f"Value scale checked: {detail}."
    norm_offset = np.zeros(len(level)) if scaler.offset is None else scaler.offset
    raw_medians = np.median(sample, axis=1)
    wanted = np.abs(level - norm_offset)[usable] / np.maximum(np.abs(raw_medians[usable]), 1e-30)
    factor = min(SCALE_CHOICES, key=lambda c: abs(math.log10(c) - float(np.median(np.log10(wanted)))))
    suggest_offset = float(np.median(norm_offset))
    fix = f"SCALE={_fmt(factor)}" + (f" and OFFSET={_fmt(suggest_offset)}" if suggest_offset else "")
    hint = " (0-1 reflectance given to a model of digital numbers?)" if decades < -3 else ""
    raise PluginError(
        f"{source} values are about {10 ** abs(decades):.0f}x {'smaller' if decades < 0 else 'larger'} than the "
        f"model expects{hint}: {detail}; set {fix} (value*SCALE+OFFSET), or use a raster in the model's units.")


#: the input factors a refusal suggests (0-1 or percent reflectance <-> digital numbers x 10000)
SCALE_CHOICES = (1e-4, 1e-2, 1e2, 1e4)


def _fmt(value: float) -> str:
    """A number as a user types it (``10000``, ``0.0001``, ``1523.4``)."""
    value = float(value)
    return f"{value:.0f}" if abs(value) >= 100 and value == round(value) else f"{value:.4g}"


def _per_band(values: Sequence[float] | None, n: int, name: str, default: float | None = None) -> np.ndarray:
    if values is None:
        if default is None:
            raise PluginError(f"model metadata normalisation lacks '{name}'; "
                              "re-export the model with explora-geo.")
        return np.full(n, default, dtype=np.float64)
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise PluginError(f"model metadata normalisation '{name}' has {arr.size} values for {n} bands; "
                          "re-export the model with explora-geo.")
    return arr

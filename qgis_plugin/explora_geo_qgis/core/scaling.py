"""Input scaling in numpy, from the ``normalization`` entry of an exported model's metadata.

The formulas are those of ``explora_geo.normalization.Normalization`` (the library); the plugin cannot import
the library (it must not need torch), so they are re-stated here and a parity test in the library's suite
(``tests/lib/test_export.py``) checks both give the same numbers.

Schemes, per band, after subtracting ``offset`` (digital numbers):

- ``reflectance``: ``x / divide``;
- ``meanstd``: ``(x - mean) / std``;
- ``satmae``: clip to ``[mean - 2 std, mean + 2 std]``, then map that range to ``[0, 1]``;
- ``none``: identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PluginError

SCHEMES = ("reflectance", "meanstd", "satmae", "none")


@dataclass(frozen=True)
class Scaler:
    """Vectorised per-band scaling of ``[..., C, H, W]`` arrays to float32.

    Attributes:
        scheme: one of :data:`SCHEMES`.
        bands: band names, in channel order.
        sub: per-band value subtracted first, shape ``[C]`` (offset, plus ``mean`` or the clip low end).
        mul: per-band factor applied after subtracting, shape ``[C]``.
        low, high: per-band clip range in digital numbers (``satmae`` only), shape ``[C]``.
    """

    scheme: str
    bands: tuple[str, ...]
    sub: np.ndarray
    mul: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None

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
            return cls(scheme, bands, offset, np.full(n, 1.0 / divide))
        if scheme == "none":
            return cls(scheme, bands, offset, np.ones(n))
        mean = _per_band(norm.get("mean"), n, "mean")
        std = _per_band(norm.get("std"), n, "std")
        if scheme == "meanstd":
            return cls(scheme, bands, offset + mean, 1.0 / std)
        low, high = mean - 2 * std, mean + 2 * std
        return cls(scheme, bands, offset + low, 1.0 / (high - low), low=low, high=high)

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
            # clip(x - offset, low, high) - low  ==  clip(x - offset - low, 0, high - low); two ufuncs instead of
            # np.clip, whose array-bounds path (numpy 1.24) made this whole call ~4x slower (same results)
            np.maximum(y, np.float32(0.0), out=y)
            np.minimum(y, (self.high - self.low).astype(np.float32)[col], out=y)
        np.multiply(y, self.mul.astype(np.float32)[col], out=y)
        return y


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

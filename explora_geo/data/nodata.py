"""Nodata handling for patches: valid-pixel masks, nodata fractions and filling (pure numpy functions).

A pixel is *missing* when every band equals the nodata value, or when any band is NaN. A patch with more
than a chosen fraction of missing pixels is rejected (and redrawn by the sampler); the missing pixels of an
accepted patch are filled with the per-band mean of its valid pixels, so they stay neutral in any loss, and
the boolean ``valid_mask`` travels with the sample.
"""

from __future__ import annotations

import numpy as np

__all__ = ["valid_mask", "nodata_fraction", "fill_nodata"]


def valid_mask(image: np.ndarray, nodata: float | None) -> np.ndarray:
    """Valid pixels of ``image``.

    Args:
        image: ``[C, H, W]`` pixels (any dtype, digital numbers).
        nodata: the nodata value, or ``None`` (then only NaNs are missing).

    Returns:
        bool ``[H, W]``: True where the pixel holds data.
    """
    valid = np.ones(image.shape[-2:], dtype=bool)
    if np.issubdtype(image.dtype, np.floating):
        valid &= ~np.isnan(image).any(axis=0)
        if nodata is not None and np.isnan(nodata):
            return valid
    if nodata is None:
        return valid
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        if not info.min <= nodata <= info.max or nodata != int(nodata):
            return valid  # no pixel can equal it
    value = image.dtype.type(nodata)
    # "every band equals nodata" <=> max == min == nodata: two reductions instead of a [C, H, W] temporary
    high = image.max(axis=0)
    if value == (np.iinfo(image.dtype).min if np.issubdtype(image.dtype, np.integer) else -np.inf):
        return valid & (high != value)  # nodata is the smallest value: max alone decides
    return valid & ((high != value) | (image.min(axis=0) != value))


def nodata_fraction(valid: np.ndarray) -> float:
    """Fraction (0..1) of missing pixels given a bool ``[H, W]`` valid mask."""
    return 1.0 - float(valid.mean()) if valid.size else 1.0


def fill_nodata(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Float32 copy of ``image`` ``[C, H, W]`` whose missing pixels hold the band's mean over valid pixels.

    A band with no valid pixel is filled with 0. NaNs at valid pixels cannot occur (see :func:`valid_mask`).
    """
    out = image.astype(np.float32, copy=True)
    if valid.all():
        return out
    missing = ~valid
    count = int(valid.sum())
    for band in out:
        band[missing] = float(band[valid].mean(dtype=np.float64)) if count else 0.0
    return out

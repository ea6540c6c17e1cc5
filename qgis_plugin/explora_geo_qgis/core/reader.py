"""The engine's view of an input raster: a reader of pixel windows on the working grid, and the no-data rules.

Every front end (the QGIS algorithms, ``explora-geo predict``) hands the engine a :class:`RasterReader`: the
input already resampled to the model's GSD on a north-up grid of ``width`` x ``height`` pixels, whose
:meth:`RasterReader.read` returns the model bands of a window and which of its pixels are valid. The QGIS
plugin implements it over a layer's data provider (``algorithms/raster_source.py``); :class:`ArrayReader`
implements it over numpy arrays (tests, rasters already in memory); a GDAL/rasterio reader implements it the
same way.

A pixel is **valid** when it lies inside the raster (and inside the mask, if any) and *no* model band is
nodata there. A band value is nodata when (:class:`NodataRule`) it is NaN or infinite (float bands), equals
one of the band's nodata values (the source's, when it is used, and any extra value the user gave), or lies in
one of the band's no-data ranges (QGIS's user no-data ranges, with their bound inclusion).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import PluginError


@dataclass(frozen=True)
class NodataRange:
    """Values ``minimum .. maximum`` are nodata (a NaN bound is open-ended, as in ``QgsRasterRange``).

    Attributes:
        minimum, maximum: the range's ends, in the band's units.
        include_min, include_max: whether each end itself is nodata.
    """

    minimum: float
    maximum: float
    include_min: bool = True
    include_max: bool = True

    def contains(self, values: np.ndarray) -> np.ndarray:
        """``[...]`` bool: which ``values`` fall in the range."""
        inside = np.ones(values.shape, dtype=bool)
        if not math.isnan(self.minimum):
            inside &= (values >= self.minimum) if self.include_min else (values > self.minimum)
        if not math.isnan(self.maximum):
            inside &= (values <= self.maximum) if self.include_max else (values < self.maximum)
        return inside


@dataclass(frozen=True)
class NodataRule:
    """Which values of one band are nodata: non-finite floats, ``values`` and ``ranges``."""

    values: tuple[float, ...] = ()
    ranges: tuple[NodataRange, ...] = ()

    def apply(self, band: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Clear ``valid`` (``[h, w]`` bool, in place) where ``band`` (``[h, w]``, any numeric dtype) is nodata;
        returns ``valid``."""
        if band.dtype.kind == "f":
            valid &= np.isfinite(band)
        for value in self.values:
            scalar = _as_dtype(value, band.dtype)
            if scalar is not None:
                valid &= band != scalar
        for span in self.ranges:
            valid &= ~span.contains(band)
        return valid

    def with_value(self, value: float | None) -> NodataRule:
        """This rule plus one more nodata value (``None``: unchanged)."""
        if value is None or value in self.values:
            return self
        return NodataRule((*self.values, float(value)), self.ranges)


def _as_dtype(value: float, dtype: np.dtype) -> np.generic | None:
    """``value`` as a scalar of ``dtype``, or ``None`` when no pixel of that type can hold it (a NaN value is
    covered by the non-finite check)."""
    if math.isnan(value):
        return None
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if value != int(value) or not info.min <= value <= info.max:
            return None
        return dtype.type(int(value))
    return dtype.type(value)


class RasterReader(ABC):
    """A raster on the engine's working grid (north-up, the model's GSD), read window by window.

    Attributes:
        width, height: working grid size, pixels.
        n_bands: bands returned by :meth:`read` (the model's bands, in model order).
        geotransform: GDAL geotransform of the working grid (origin and pixel size in CRS units).
        crs_wkt: the working CRS as WKT.
    """

    width: int
    height: int
    n_bands: int
    geotransform: tuple[float, float, float, float, float, float]
    crs_wkt: str

    @abstractmethod
    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of rows ``r0:r1`` and columns ``c0:c1`` (inside the grid).

        Returns:
            ``[C, h, w]`` values in the model's band order (any numeric dtype; nodata pixels may hold anything,
            NaN included) and ``[h, w]`` bool validity (see the module docstring). A window the source cannot
            deliver (e.g. an empty reprojected block) is returned all invalid, never raised.
        """

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read(r0, r1, c0, c1)


class ArrayReader(RasterReader):
    """A :class:`RasterReader` over in-memory arrays (already on the working grid).

    Args:
        data: ``[C, H, W]`` values, model band order.
        valid: ``[H, W]`` bool, pixels valid before the no-data rules (all when ``None``).
        rules: one :class:`NodataRule` per band (none: only non-finite floats are nodata).
        geotransform, crs_wkt: the grid's georeferencing.
    """

    def __init__(self, data: np.ndarray, valid: np.ndarray | None = None, rules: Sequence[NodataRule] = (),
                 geotransform: tuple[float, ...] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), crs_wkt: str = "") -> None:
        if data.ndim != 3:
            raise PluginError(f"raster data must be [bands, rows, cols], got shape {data.shape}.")
        self.data = data
        self.valid = np.ones(data.shape[1:], bool) if valid is None else valid
        self.rules = list(rules) or [NodataRule()] * data.shape[0]
        self.n_bands, self.height, self.width = data.shape
        self.geotransform = tuple(float(v) for v in geotransform)  # type: ignore[assignment]
        self.crs_wkt = crs_wkt

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        values = self.data[:, r0:r1, c0:c1]
        valid = self.valid[r0:r1, c0:c1].copy()
        for band, rule in zip(values, self.rules):
            rule.apply(band, valid)
        return values, valid


def sample_valid_pixels(reader: RasterReader, *, windows: int = 3, size: int = 64,
                        max_pixels: int = 20000) -> np.ndarray:
    """Valid pixels from ``windows`` x ``windows`` windows of ``size`` px spread evenly over the grid.

    Returns:
        ``[C, N]`` float64 values of the valid pixels (``N`` may be 0), at most ``max_pixels``.
    """
    rows = _spread(reader.height, size, windows)
    cols = _spread(reader.width, size, windows)
    picked: list[np.ndarray] = []
    for r0 in rows:
        for c0 in cols:
            data, valid = reader.read(r0, min(r0 + size, reader.height), c0, min(c0 + size, reader.width))
            if valid.any():
                picked.append(data[:, valid].astype(np.float64))
    if not picked:
        return np.empty((reader.n_bands, 0))
    values = np.concatenate(picked, axis=1)
    step = -(-values.shape[1] // max_pixels)  # ceil: at most max_pixels
    return values[:, ::step]


def _spread(extent: int, size: int, count: int) -> list[int]:
    """Start offsets of up to ``count`` windows of ``size`` spread evenly over ``extent`` pixels."""
    if extent <= size:
        return [0]
    return sorted({round(v) for v in np.linspace(0, extent - size, count)})

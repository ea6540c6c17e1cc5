"""The tile grid: where tiles sit on the working raster and which output cell each one fills.

The working raster is the input resampled to the model's GSD (``width`` x ``height`` pixels). Tiles of
``tile`` pixels are laid every ``stride`` pixels (``stride = tile`` without overlap). Each tile fills one
output cell, its central ``stride`` x ``stride`` pixels, so the cells tile the working raster exactly from its
origin and the outputs have ``ceil(width / stride)`` x ``ceil(height / stride)`` cells of ``stride * gsd``
metres. Tile ``(r, c)`` covers rows ``r * stride - margin ...`` and columns ``c * stride - margin ...`` with
``margin = (tile - stride) // 2``. Edge tiles reach beyond the raster: when the raster holds a whole tile
(:attr:`TileGrid.holds_a_tile`), that part is neither valid nor invalid for a tile's valid fraction (which
then counts only its pixels inside the raster, see :func:`valid_fractions`); on a raster smaller than a tile
it counts as invalid, so such a raster is not judged on a mostly padded tile. Either way it is filled like
nodata before the model sees the tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import PluginError


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a ``width`` x ``height`` pixel raster.

    Attributes:
        width, height: working raster size, pixels.
        tile: tile side, pixels (the model's input size).
        stride: distance between tile origins, pixels (``1 <= stride <= tile``).
    """

    width: int
    height: int
    tile: int
    stride: int

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.tile:
            raise PluginError(f"stride {self.stride} px must be between 1 and the tile size {self.tile} px; "
                              "lower the stride (or raise the overlap).")
        if self.width < 1 or self.height < 1:
            raise PluginError(f"the area to process is empty ({self.width} x {self.height} px at the model's "
                              "resolution); choose a larger extent.")

    @classmethod
    def from_overlap(cls, width: int, height: int, tile: int, overlap: float) -> TileGrid:
        """Grid with ``overlap`` as a fraction of the tile (0 <= overlap < 1)."""
        if not 0.0 <= overlap < 1.0:
            raise PluginError(f"overlap {overlap} must be at least 0 and below 1 (a fraction of the tile).")
        return cls(width, height, tile, max(1, round(tile * (1.0 - overlap))))

    @property
    def margin(self) -> int:
        """Pixels a tile extends beyond its output cell on the top and left."""
        return (self.tile - self.stride) // 2

    @property
    def n_rows(self) -> int:
        return math.ceil(self.height / self.stride)

    @property
    def n_cols(self) -> int:
        return math.ceil(self.width / self.stride)

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def strip_width(self) -> int:
        """Width of one row of tiles, pixels, from the left edge of tile 0 to the right edge of the last."""
        return (self.n_cols - 1) * self.stride + self.tile

    @property
    def holds_a_tile(self) -> bool:
        """Whether the raster is at least one tile wide and high: then a tile's valid fraction counts only its
        pixels inside the raster; otherwise over the whole tile (the part beyond the raster invalid)."""
        return self.width >= self.tile and self.height >= self.tile

    def inside_counts(self, row: int) -> np.ndarray:
        """``[n_cols]`` int64: how many pixels of each tile of tile row ``row`` lie inside the raster (at least
        one: every tile holds its output cell's first pixel)."""
        top = row * self.stride - self.margin
        rows = min(top + self.tile, self.height) - max(top, 0)
        left = np.arange(self.n_cols, dtype=np.int64) * self.stride - self.margin
        cols = np.minimum(left + self.tile, self.width) - np.maximum(left, 0)
        return rows * cols

    def strip_window(self, row: int) -> tuple[int, int, int, int]:
        """Pixel window ``(row0, row1, col0, col1)`` (may extend outside the raster) of tile row ``row``."""
        row0 = row * self.stride - self.margin
        col0 = -self.margin
        return row0, row0 + self.tile, col0, col0 + self.strip_width

    def row_bands(self, rows_per_band: int) -> list[tuple[int, int]]:
        """The tile rows split into bands ``[(r0, r1), ...]`` of ``rows_per_band`` rows (the last may be shorter):
        the parts of a large raster that separate processes run; a band's cells are its tile rows' cells."""
        if rows_per_band < 1:
            raise PluginError(f"rows per band {rows_per_band} must be at least 1.")
        return [(r, min(r + rows_per_band, self.n_rows)) for r in range(0, self.n_rows, rows_per_band)]

    def windows_over(self, y0: int, y1: int) -> tuple[int, int]:
        """Tile rows ``(r0, r1)`` whose tiles (windows) reach raster rows ``y0 .. y1 - 1``: what a per-pixel
        product of those rows blends (tile ``r`` covers rows ``r * stride - margin`` to ``+ tile - 1``)."""
        first = -(-(y0 + self.margin - self.tile + 1) // self.stride)  # ceil
        last = (y1 - 1 + self.margin) // self.stride
        return max(first, 0), min(last + 1, self.n_rows)

    def cell_geotransform(self, geotransform: tuple[float, ...]) -> tuple[float, ...]:
        """GDAL geotransform of the output cell grid, given the working raster's (north-up)."""
        x0, px, _, y0, _, py = geotransform
        return (x0, px * self.stride, 0.0, y0, 0.0, py * self.stride)


def clamp_window(window: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """Intersection of a pixel window with the raster ``[0, height) x [0, width)`` (may be empty)."""
    r0, r1, c0, c1 = window
    return max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)


def tile_views(strip: np.ndarray, tile: int, stride: int, n_cols: int) -> np.ndarray:
    """Views of ``n_cols`` tiles in a strip ``[..., tile, W]`` -> ``[n_cols, ..., tile, tile]`` (no copy)."""
    windows = np.lib.stride_tricks.sliding_window_view(strip, tile, axis=-1)[..., ::stride, :][..., :n_cols, :]
    # windows: [..., tile(rows), n_cols, tile(cols)] -> [n_cols, ..., tile, tile]
    return np.moveaxis(windows, -2, 0)


def valid_fractions(valid: np.ndarray, tile: int, stride: int, n_cols: int,
                    inside: np.ndarray | None = None) -> np.ndarray:
    """Fraction of valid pixels of each tile of a strip mask ``[tile, W]`` (bool) -> ``[n_cols]`` float32.

    ``inside``: ``[n_cols]`` pixels of each tile inside the raster (:meth:`TileGrid.inside_counts`); the
    fraction is then over those pixels only (the mask must be False beyond the raster), so an edge tile is
    judged on its in-raster pixels. Default: over all ``tile * tile`` pixels.
    """
    per_column = valid.sum(axis=0, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(per_column)])
    starts = np.arange(n_cols) * stride
    total = np.full(n_cols, tile * tile, np.int64) if inside is None else np.maximum(inside, 1)
    return ((cumulative[starts + tile] - cumulative[starts]) / total).astype(np.float32)


def fill_invalid(tiles: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace the nodata pixels of each tile and band by the mean of that tile's valid pixels, in place.

    Nodata pixels may hold anything (NaN, inf, the nodata value): they are masked out *before* the mean is
    taken, so they never reach the model. Only tiles with some nodata are touched.

    Args:
        tiles: ``[N, C, T, T]`` float32 scaled tiles.
        valid: ``[N, T, T]`` bool masks (each tile must have at least one valid pixel).

    Returns:
        ``tiles``.
    """
    partial = np.flatnonzero(~valid.reshape(len(valid), -1).all(axis=1))
    if partial.size == 0:
        return tiles
    sub, mask = tiles[partial], valid[partial][:, None]  # [P, C, T, T], [P, 1, T, T]
    kept = np.where(mask, sub, np.float32(0.0))
    counts = np.maximum(mask.sum(axis=(2, 3), dtype=np.int64), 1)  # [P, 1]
    means = (kept.sum(axis=(2, 3), dtype=np.float64) / counts).astype(np.float32)  # [P, C]
    tiles[partial] = np.where(mask, kept, means[:, :, None, None])
    return tiles

"""Per-pixel maps from overlapping windows: blend the logits of every window covering a pixel.

A segmenter gives logits ``[K, T, T]`` per window (tile). Windows are laid on the shared :class:`TileGrid`
(stride ``S``, margin ``m = (T - S) // 2``: tile ``(r, c)`` covers rows ``r * S - m ...`` and columns
``c * S - m ...`` of the working raster), so with overlap every pixel lies in several windows. Each window's
logits are weighted by a smooth window :func:`window_weights` (high in the centre, where the model sees the
most context, small but positive at the border) and the weighted logits are averaged:

    logits(p) = sum_w weight_w(p) * logits_w(p) / sum_w weight_w(p)

so there is no seam at window borders, and a pixel covered by a single window gets exactly that window's
logits. Softmax of the blended logits gives the class probabilities.

Windows arrive in row-major order, so :class:`LogitBlender` keeps only a band of ``T`` raster rows in memory:
when the first window of tile row ``r`` arrives, no later window reaches the rows above ``r * S - m`` and
those rows are final.
"""

from __future__ import annotations

import numpy as np

from .tiling import TileGrid
from .writers import CLASS_NODATA, FLOAT_NODATA


def window_weights(tile: int) -> np.ndarray:
    """``[tile, tile]`` float32 blending weights: the outer product of a squared-sine (Hann) window sampled at
    pixel centres, ``sin(pi * (i + 0.5) / tile) ** 2``, so every weight is positive (the border ones are about
    ``(pi / (2 * tile)) ** 2`` of the centre's)."""
    if tile < 1:
        raise ValueError(f"tile must be at least 1 px, got {tile}")
    ramp = np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
    return np.outer(ramp, ramp).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (float32)."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted.astype(np.float32, copy=False)


class LogitBlender:
    """Accumulate window logits into a per-pixel class map of the working raster.

    Args:
        grid: the tile grid (``grid.tile`` = the model's input size).
        n_classes: K, logit channels per window.
        valid: ``[height, width]`` bool, the raster's valid pixels; invalid pixels are nodata in the outputs.
            It may be filled while windows arrive, as long as a row is filled before it is final (the tiled
            run reads each strip before its windows run). ``None``: every pixel is valid.
        weights: ``[T, T]`` window weights (default :func:`window_weights`).
        rows: ``(y0, y1)``: keep only raster rows ``y0 .. y1 - 1`` (a part of a large raster, see
            :meth:`TileGrid.windows_over` for the windows that must be added); ``valid`` then has those rows.
            Default: all rows.

    After :meth:`finish`: ``class_id`` ``[height, width]`` (``[y1 - y0, width]`` from raster row ``row0 = y0``)
    uint8 (``CLASS_NODATA`` where no window ran or the
    pixel is invalid; int16 with -1 beyond 254 classes) and ``probability`` ``[height, width]`` float32
    (top-class probability, ``FLOAT_NODATA`` where no class).
    """

    def __init__(self, grid: TileGrid, n_classes: int, valid: np.ndarray | None = None,
                 weights: np.ndarray | None = None, rows: tuple[int, int] | None = None) -> None:
        self.grid = grid
        self.n_classes = n_classes
        self.weights = window_weights(grid.tile) if weights is None else weights.astype(np.float32)
        if self.weights.shape != (grid.tile, grid.tile):
            raise ValueError(f"weights must be {grid.tile} x {grid.tile}, got {self.weights.shape}")
        self.valid = valid
        width = grid.strip_width
        self._acc = np.zeros((n_classes, grid.tile, width), np.float32)
        self._wsum = np.zeros((grid.tile, width), np.float32)
        self._origin: int | None = None  # raster row of the band's first row
        dtype, self.nodata_id = (np.uint8, CLASS_NODATA) if n_classes < CLASS_NODATA else (np.int16, -1)
        self.row0, self.row1 = (0, grid.height) if rows is None else (max(rows[0], 0), min(rows[1], grid.height))
        if self.row1 <= self.row0:
            raise ValueError(f"rows {rows} hold no row of the {grid.height}-row raster")
        self.class_id = np.full((self.row1 - self.row0, grid.width), self.nodata_id, dtype)
        self.probability = np.full((self.row1 - self.row0, grid.width), FLOAT_NODATA, np.float32)

    def add(self, rows: np.ndarray, cols: np.ndarray, logits: np.ndarray) -> None:
        """Add windows ``(rows[i], cols[i])`` with ``logits[i]`` ``[K, T, T]``, in row-major order."""
        t, s = self.grid.tile, self.grid.stride
        for r, c, value in zip(np.asarray(rows).tolist(), np.asarray(cols).tolist(), logits):
            self._move_to(r * s - self.grid.margin)
            x0 = c * s
            self._acc[:, :, x0:x0 + t] += value * self.weights
            self._wsum[:, x0:x0 + t] += self.weights

    def finish(self) -> None:
        """Finalise the rows still in the band (call once, after the last window)."""
        if self._origin is not None:
            self._finalize(self.grid.tile)
            self._origin = None

    def _move_to(self, origin: int) -> None:
        """Make the band start at raster row ``origin``, finalising the rows above it."""
        if self._origin is None:
            self._origin = origin
            return
        shift = origin - self._origin
        if shift < 0:
            raise ValueError("windows must arrive in row-major order")
        if shift == 0:
            return
        t = self.grid.tile
        self._finalize(min(shift, t))
        if shift < t:
            self._acc[:, :t - shift] = self._acc[:, shift:]
            self._wsum[:t - shift] = self._wsum[shift:]
            self._acc[:, t - shift:] = 0.0
            self._wsum[t - shift:] = 0.0
        else:
            self._acc[:] = 0.0
            self._wsum[:] = 0.0
        self._origin = origin

    def _finalize(self, n: int) -> None:
        """Write the first ``n`` band rows (those inside the raster) to the outputs."""
        g, m = self.grid, self.grid.margin
        top = self._origin
        r0, r1 = max(top, self.row0), min(top + n, self.row1)
        if r1 <= r0:
            return
        band = slice(r0 - top, r1 - top)
        cols = slice(m, m + g.width)  # band column j is raster column j - m
        wsum = self._wsum[band, cols]
        covered = wsum > 0
        out = slice(r0 - self.row0, r1 - self.row0)
        if self.valid is not None:
            covered &= self.valid[out]
        if not covered.any():
            return
        logits = self._acc[:, band, cols][:, covered] / wsum[covered]  # [K, n_covered]
        probs = softmax(logits, axis=0)
        out_ids = self.class_id[out]
        out_prob = self.probability[out]
        out_ids[covered] = probs.argmax(axis=0)
        out_prob[covered] = probs.max(axis=0)


class SegmentationConsumer:
    """Receives a tiled run's windows as they come and blends them (the tiled run's ``consumer`` hook), so a
    segmenter's ``[K, T, T]`` logits are never stored per tile.

    ``start(grid)`` is called before the run; ``strip(row, valid)`` by the reader thread with each strip's
    ``[T, strip_width]`` valid mask (kept as the raster's ``[H, W]`` valid mask); ``batch(rows, cols, values)``
    with each batch's outputs; ``finish()`` after the last batch. The results are ``blender.class_id`` and
    ``blender.probability`` on the working raster's pixels.

    Args:
        n_classes: K.
        output: the model output holding the logits.
        rows: ``(y0, y1)``: blend only raster rows ``y0 .. y1 - 1`` (a part; run the tile rows
            ``grid.windows_over(y0, y1)``); default all.
    """

    def __init__(self, n_classes: int, output: str = "logits", rows: tuple[int, int] | None = None) -> None:
        self.n_classes = n_classes
        self.output = output
        self.rows = rows
        self.grid: TileGrid | None = None
        self.valid: np.ndarray | None = None
        self.blender: LogitBlender | None = None

    def start(self, grid: TileGrid) -> None:
        self.grid = grid
        y0, y1 = (0, grid.height) if self.rows is None else self.rows
        self.valid = np.zeros((min(y1, grid.height) - max(y0, 0), grid.width), bool)
        self.blender = LogitBlender(grid, self.n_classes, valid=self.valid, rows=self.rows)

    def strip(self, row: int, valid: np.ndarray) -> None:
        g, b = self.grid, self.blender
        r0, _, c0, _ = g.strip_window(row)
        top, left = max(r0, b.row0), max(c0, 0)
        bottom, right = min(r0 + valid.shape[0], b.row1), min(c0 + valid.shape[1], g.width)
        if bottom > top and right > left:
            self.valid[top - b.row0:bottom - b.row0, left:right] = valid[top - r0:bottom - r0, left - c0:right - c0]

    def batch(self, rows: np.ndarray, cols: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self.blender.add(rows, cols, values[self.output])

    def finish(self) -> None:
        self.blender.finish()

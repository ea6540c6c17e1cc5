"""Tiled inference over a large raster: read strips in a thread, scale, batch, run, stitch.

This is the engine every front end shares (the QGIS algorithms, ``explora-geo predict``):
:func:`infer` takes a :class:`~.reader.RasterReader` (the input on the model's grid), an :class:`~.model.OnnxModel`
and :class:`RunSettings`, checks the layer's value scale, runs the model on every tile with enough valid pixels
and returns :class:`TileResults` (per-cell outputs, validity, counts, timing, the cell grid's georeferencing).

Per-tile overhead, not the model, dominates naive plugins. Here a background thread reads one row of tiles
(a strip) per call, scales it in one vectorised operation and cuts its tiles as array views, while the
calling thread runs ONNX Runtime on full batches (both release the GIL during their heavy work). Results are
stitched into ``[rows, cols, ...]`` arrays, one entry per tile.

Tile rules: a tile's valid fraction counts only its pixels inside the raster (the part of an edge tile beyond
the raster is neither valid nor invalid; nodata pixels inside the raster are invalid), unless the raster is
smaller than a tile (then the part beyond counts as invalid: :attr:`~.tiling.TileGrid.holds_a_tile`). A tile
whose valid fraction is below ``min_valid`` (or zero) is **skipped**: every output is NaN there (nodata in the products).
A tile above it runs with its nodata pixels, and its part beyond the raster, filled by the tile's per-band
valid mean (it is **partial** when some pixel inside the raster was nodata); NaN never reaches the model.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import PluginError
from .model import OnnxModel
from .reader import RasterReader, sample_valid_pixels
from .scaling import Scaler, check_value_scale
from .tiling import TileGrid, clamp_window, fill_invalid, tile_views, valid_fractions

#: ``reader(row0, row1, col0, col1)`` -> (``[C, h, w]`` values in model band order, ``[h, w]`` bool valid mask)
#: for a window inside the working raster; a :class:`~.reader.RasterReader` is one.
Reader = Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]


class Cancelled(Exception):
    """The user cancelled the run."""


@dataclass(frozen=True)
class RunSettings:
    """How :func:`infer` tiles and runs.

    Attributes:
        overlap: tile overlap, fraction of the tile (0 <= overlap < 1).
        batch_size: tiles per forward pass.
        min_valid: tiles with a smaller valid-pixel fraction are skipped (0..1).
        scale, offset: input transform ``value * scale + offset`` applied before the normalisation.
        check_scale: sample the raster and refuse values on a clearly different scale from the model's.
        prefetch: strips read ahead by the reader thread.
    """

    overlap: float = 0.0
    batch_size: int = 32
    min_valid: float = 0.5
    scale: float = 1.0
    offset: float = 0.0
    check_scale: bool = True
    prefetch: int = 3


class TileConsumer(Protocol):
    """Takes a tiled run's outputs as they come instead of storing them per tile (e.g. per-pixel logits,
    blended into a map by :class:`~.blending.SegmentationConsumer`)."""

    def start(self, grid: TileGrid) -> None:
        """Called once, before the first strip is read."""

    def strip(self, row: int, valid: np.ndarray) -> None:
        """Tile row ``row``'s ``[T, strip_width]`` valid mask; called in the reader thread, in row order."""

    def batch(self, rows: np.ndarray, cols: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """The outputs ``[n, ...]`` of tiles ``(rows[i], cols[i])``, in row-major order."""

    def finish(self) -> None:
        """Called once after the last batch (not when the run failed or was cancelled)."""


@dataclass
class TileResults:
    """Per-tile outputs on the cell grid of ``grid`` (or on a band of its tile rows, from ``row0``).

    Attributes:
        grid: the tile grid.
        valid_fraction: ``[R, K]`` fraction of valid pixels among each tile's pixels inside the raster (0..1;
            over the whole tile when the raster is smaller than a tile).
        ran: ``[R, K]`` whether the model ran on the tile (valid fraction >= the threshold, and > 0).
        outputs: model output name -> ``[R, K, ...]`` float32, NaN where the model did not run; every requested
            output is present, also when no tile ran.
        tiles_run: tiles that went through the model (partial ones included).
        seconds: wall time of the whole run, seconds.
        forward_seconds: time spent inside ONNX Runtime, seconds.
        min_valid: the threshold used.
        geotransform: GDAL geotransform of the output cell grid (``None`` when the reader gave none).
        crs_wkt: the outputs' CRS as WKT.
        notes: log lines of the run (value-scale check, why no tile ran, ...).
        row0: the grid's tile row of the arrays' first row (0 unless the run covered a band of rows); the
            ``[R, K]`` arrays then have that band's rows, and ``geotransform`` stays the whole grid's.
    """

    grid: TileGrid
    valid_fraction: np.ndarray
    ran: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    tiles_run: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    min_valid: float = 0.5
    geotransform: tuple[float, ...] | None = None
    crs_wkt: str = ""
    notes: list[str] = field(default_factory=list)
    row0: int = 0

    @property
    def tiles_per_second(self) -> float:
        return self.tiles_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def partial(self) -> np.ndarray:
        """``[R, K]`` bool: tiles that ran with some nodata pixels inside the raster filled."""
        return self.ran & (self.valid_fraction < 1.0)

    @property
    def tiles_partial(self) -> int:
        return int(self.partial.sum())

    @property
    def tiles_skipped(self) -> int:
        return int(self.ran.size - self.tiles_run)

    def empty_reason(self) -> str | None:
        """Why no tile ran (one sentence), or ``None`` when some did."""
        if self.tiles_run:
            return None
        g = self.grid
        best = float(self.valid_fraction.max()) if self.valid_fraction.size else 0.0
        if best == 0.0:
            return ("no valid pixel in the area (every pixel is nodata or NaN, or outside the layer or the mask); "
                    "the outputs are all nodata")
        if g.width < g.tile and g.height < g.tile:
            return (f"the area ({g.width} x {g.height} px at the model's resolution) is smaller than one "
                    f"{g.tile} px tile, so its tile is only {best:.0%} valid, below MIN_VALID {self.min_valid:.0%}; "
                    "the outputs are all nodata (choose a larger area or lower MIN_VALID)")
        return (f"no tile has MIN_VALID {self.min_valid:.0%} valid pixels (the best has {best:.0%}); the outputs "
                "are all nodata (lower MIN_VALID or choose another area)")

    def summary(self, device: str = "") -> str:
        """One log line: tiles processed / partial / skipped, speed, device."""
        on = f" on {device}" if device else ""
        return (f"Ran {self.tiles_run} of {self.ran.size} tiles ({self.tiles_partial} partial: nodata pixels "
                f"filled) in {self.seconds:.2f} s: {self.tiles_per_second:.1f} tiles/s{on}; {self.tiles_skipped} "
                f"tiles skipped (valid fraction below {self.min_valid:g}, nodata in every output); "
                f"{self.forward_seconds:.2f} s inside ONNX Runtime.")


def infer(
    reader: RasterReader,
    model: OnnxModel,
    settings: RunSettings = RunSettings(),
    *,
    outputs: Sequence[str] = ("embedding",),
    progress: Callable[[float], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    source: str = "the raster",
    consumer: TileConsumer | None = None,
    rows: tuple[int, int] | None = None,
) -> TileResults:
    """Check the value scale, then run ``model`` on every tile of ``reader`` (see the module docstring).

    Args:
        reader: the input on the working grid.
        model: the ONNX model (its tile size sets the tiles).
        settings: tiling, batching, validity threshold and input transform.
        outputs: model outputs to keep (``"embedding"``, ``"probabilities"``).
        progress: called with percent done (0..100).
        is_cancelled: polled between batches; when it returns True the run stops with :class:`Cancelled`.
        source: the raster's name, for messages.
        consumer: takes the outputs as they come instead of storing them per tile (see :class:`TileConsumer`).
        rows: only the tile rows ``r0 .. r1 - 1`` of the grid (a part of a large raster; see
            :func:`run_tiles`). Each tile is read, scaled and filled exactly as in a run over the whole raster.

    Raises:
        PluginError: bad settings, or a value scale clearly different from the model's (with the fix).
        Cancelled: when ``is_cancelled()`` became true.
    """
    start = time.perf_counter()
    grid = TileGrid.from_overlap(reader.width, reader.height, model.info.tile_size, settings.overlap)
    scaler = model.info.scaler.with_input(settings.scale, settings.offset)
    notes = []
    if settings.check_scale:
        notes.append(check_value_scale(sample_valid_pixels(reader), model.info.scaler, scale=settings.scale,
                                       offset=settings.offset, source=source))
    result = run_tiles(reader, grid, model, outputs=outputs, batch_size=settings.batch_size,
                       min_valid=settings.min_valid, progress=progress, is_cancelled=is_cancelled,
                       prefetch=settings.prefetch, scaler=scaler, consumer=consumer, rows=rows)
    result.seconds = time.perf_counter() - start
    result.geotransform = grid.cell_geotransform(reader.geotransform)
    result.crs_wkt = reader.crs_wkt
    reason = result.empty_reason()
    result.notes = [*notes, *([f"No tile was processed: {reason}."] if reason else [])]
    return result


@dataclass
class _Strip:
    row: int
    cols: np.ndarray  # [n] tile columns that run
    tiles: np.ndarray  # [n, C, T, T] float32, scaled, nodata filled
    fractions: np.ndarray  # [n_cols] float32


def read_strip(reader: Reader, grid: TileGrid, row: int, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile row ``row`` as ``[C, T, strip_width]`` values and its ``[T, strip_width]`` valid mask; pixels outside
    the raster are invalid (zeros)."""
    window = grid.strip_window(row)
    r0, r1, c0, c1 = clamp_window(window, grid.height, grid.width)
    data, valid = reader(r0, r1, c0, c1)
    if (r0, r1, c0, c1) == window:
        return data, valid
    full = np.zeros((n_bands, grid.tile, grid.strip_width), dtype=data.dtype)
    mask = np.zeros((grid.tile, grid.strip_width), dtype=bool)
    dr, dc = r0 - window[0], c0 - window[2]
    full[:, dr:dr + (r1 - r0), dc:dc + (c1 - c0)] = data
    mask[dr:dr + (r1 - r0), dc:dc + (c1 - c0)] = valid
    return full, mask


def prepare_strip(data: np.ndarray, valid: np.ndarray, grid: TileGrid, scaler: Scaler, min_valid: float,
                  row: int) -> _Strip:
    """Compute the tile valid fractions of a strip (over the tiles' in-raster pixels) and cut out, scaled and
    filled, the tiles that will run."""
    inside = grid.inside_counts(row)
    fractions = valid_fractions(valid, grid.tile, grid.stride, grid.n_cols,
                                inside=inside if grid.holds_a_tile else None)
    cols = np.flatnonzero((fractions >= min_valid) & (fractions > 0))
    if cols.size == 0:
        return _Strip(row, cols, np.empty((0, data.shape[0], grid.tile, grid.tile), np.float32), fractions)
    views = tile_views(data, grid.tile, grid.stride, grid.n_cols)  # [n_cols, C, T, T] views, no copy
    # scaling gathers the (strided) tiles into one new contiguous float32 batch: a single pass over the data
    tiles = scaler(views if cols.size == grid.n_cols else views[cols])
    if (fractions[cols] < 1.0).any() or (inside[cols] < grid.tile * grid.tile).any():  # nodata or edge tiles
        fill_invalid(tiles, tile_views(valid, grid.tile, grid.stride, grid.n_cols)[cols])
    return _Strip(row, cols, tiles, fractions)


def run_tiles(
    reader: Reader,
    grid: TileGrid,
    model: OnnxModel,
    *,
    outputs: Sequence[str] = ("embedding",),
    batch_size: int = 32,
    min_valid: float = 0.5,
    progress: Callable[[float], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    prefetch: int = 3,
    scaler: Scaler | None = None,
    consumer: TileConsumer | None = None,
    rows: tuple[int, int] | None = None,
) -> TileResults:
    """Run ``model`` on every tile of ``grid`` whose valid fraction is at least ``min_valid`` (and above 0).

    :func:`infer` is the entry point for front ends; this is its tiled loop, without the value-scale check.

    Args:
        reader: reads windows of the working raster (see :data:`Reader`).
        grid: tile layout; ``grid.tile`` must equal the model's tile size.
        model: the ONNX model.
        outputs: model outputs to keep (``"embedding"``, ``"probabilities"``).
        batch_size: tiles per forward pass.
        min_valid: tiles with a smaller fraction of valid pixels are skipped (0..1).
        progress: called with percent done (0..100).
        is_cancelled: polled between batches; when it returns True the run stops with :class:`Cancelled`.
        prefetch: strips read ahead by the reader thread.
        scaler: the input scaling (default: the model's).
        consumer: receives the strips' valid masks and the batches' outputs as they come (see
            :class:`TileConsumer`); its outputs are then not stored per tile in ``TileResults.outputs``.
        rows: ``(r0, r1)``: run only tile rows ``r0 .. r1 - 1`` (default all); the results hold those rows
            (``TileResults.row0 = r0``) and the consumer gets their strips and batches with grid row numbers.

    Raises:
        Cancelled: when ``is_cancelled()`` became true.
    """
    if grid.tile != model.info.tile_size:
        raise PluginError(f"tile size {grid.tile} differs from the model's input size {model.info.tile_size}.")
    if batch_size < 1:
        raise PluginError(f"batch size {batch_size} must be at least 1.")
    if not 0.0 <= min_valid <= 1.0:
        raise PluginError(f"minimum valid fraction {min_valid} must be between 0 and 1.")
    first, end = (0, grid.n_rows) if rows is None else rows
    if not 0 <= first < end <= grid.n_rows:
        raise PluginError(f"tile rows {first}..{end - 1} are not rows of the {grid.n_rows}-row tile grid.")
    start = time.perf_counter()
    scaler = scaler or model.info.scaler
    n_bands = len(model.info.bands)
    shape = (end - first, grid.n_cols)
    result = TileResults(grid, np.zeros(shape, np.float32), np.zeros(shape, bool), min_valid=min_valid, row0=first)
    for name in outputs if consumer is None else ():  # a consumer takes the outputs as they come
        result.outputs[name] = np.full((*shape, *model.output_shape(name)), np.nan, np.float32)
    stop = threading.Event()
    strips: queue.Queue = queue.Queue(maxsize=max(1, prefetch))

    def produce() -> None:
        try:
            for row in range(first, end):
                if stop.is_set():
                    return
                data, valid = read_strip(reader, grid, row, n_bands)
                if consumer is not None:
                    consumer.strip(row, valid)
                item = prepare_strip(data, valid, grid, scaler, min_valid, row)
                while not stop.is_set():
                    try:
                        strips.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer, which re-raises it
            strips.put(err)

    if consumer is not None:
        consumer.start(grid)
    thread = threading.Thread(target=produce, name="explora-geo-reader", daemon=True)
    thread.start()
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    n_pending = 0
    try:
        for done in range(end - first):
            item = strips.get()
            if isinstance(item, BaseException):
                raise item
            result.valid_fraction[item.row - first] = item.fractions
            if item.cols.size:
                pending.append((item.row, item.cols, item.tiles))
                n_pending += item.cols.size
            last = done == end - first - 1
            while n_pending >= batch_size or (last and n_pending):
                n_pending -= _run_batch(model, pending, batch_size, outputs, result, consumer)
                if is_cancelled is not None and is_cancelled():
                    raise Cancelled()
            if is_cancelled is not None and is_cancelled():
                raise Cancelled()
            if progress is not None:
                progress(100.0 * (done + 1) / (end - first))
    finally:
        stop.set()
        thread.join(timeout=10)
    if consumer is not None:
        consumer.finish()
    result.seconds = time.perf_counter() - start
    return result


def _run_batch(model: OnnxModel, pending: list[tuple[int, np.ndarray, np.ndarray]], batch_size: int,
               outputs: Sequence[str], result: TileResults, consumer: TileConsumer | None = None) -> int:
    """Take up to ``batch_size`` tiles from the front of ``pending``, run them, store the outputs."""
    rows, cols, chunks, taken = [], [], [], 0
    while pending and taken < batch_size:
        row, c, tiles = pending[0]
        n = min(batch_size - taken, c.size)
        rows.append(np.full(n, row))
        cols.append(c[:n])
        chunks.append(tiles[:n])
        taken += n
        if n == c.size:
            pending.pop(0)
        else:
            pending[0] = (row, c[n:], tiles[n:])
    batch = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    t0 = time.perf_counter()
    values = model.run(batch, outputs)
    result.forward_seconds += time.perf_counter() - t0
    r, c = np.concatenate(rows), np.concatenate(cols)
    if consumer is not None:
        consumer.batch(r, c, values)
        values = {}
    r = r - result.row0
    for name, value in values.items():
        result.outputs[name][r, c] = value
    result.ran[r, c] = True
    result.tiles_run += taken
    return taken

"""Window blending of per-pixel logits (core/blending.py; numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from explora_geo_qgis.core.blending import LogitBlender, softmax, window_weights
from explora_geo_qgis.core.tiling import TileGrid
from explora_geo_qgis.core.writers import CLASS_NODATA, FLOAT_NODATA


def _windows(grid: TileGrid, field: np.ndarray, skip: set[tuple[int, int]] = frozenset()):
    """Row-major windows of a global logit field ``[K, H + pad, W + pad]`` given on raster rows/cols starting
    at ``-margin`` (so windows may reach beyond the raster)."""
    t, s = grid.tile, grid.stride
    for r in range(grid.n_rows):
        for c in range(grid.n_cols):
            if (r, c) in skip:
                continue
            y0, x0 = r * s, c * s  # in field coordinates (field row 0 = raster row -m)
            yield r, c, field[:, y0:y0 + t, x0:x0 + t]


def _field(grid: TileGrid, k: int, seed: int = 0) -> np.ndarray:
    """A smooth logit field over the raster and its margins: ``[K, rows, strip_width]``."""
    rows = (grid.n_rows - 1) * grid.stride + grid.tile
    yy, xx = np.mgrid[0:rows, 0:grid.strip_width].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b, c = rng.normal(size=(3, k, 1, 1)).astype(np.float32)
    return a * np.sin(yy / 7.0) + b * np.cos(xx / 5.0) + c * (yy - xx) / 50.0


def test_window_weights_are_smooth_positive_and_centred() -> None:
    w = window_weights(32)
    assert w.shape == (32, 32) and w.dtype == np.float32 and (w > 0).all()
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert w[15:17, 15:17].min() == w.max() and w[0, 0] == w.min() < 1e-4 * w.max()
    with pytest.raises(ValueError):
        window_weights(0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_consistent_windows_reproduce_the_field_exactly(overlap: float) -> None:
    """Windows that agree (cut from one field) blend back to that field everywhere: no seams, no offset."""
    grid = TileGrid.from_overlap(75, 41, 16, overlap)
    field = _field(grid, 3)
    blender = LogitBlender(grid, 3)
    batch = list(_windows(grid, field))
    for start in range(0, len(batch), 7):  # batches that cut across tile rows
        part = batch[start:start + 7]
        blender.add(np.array([p[0] for p in part]), np.array([p[1] for p in part]), np.stack([p[2] for p in part]))
    blender.finish()
    m = grid.margin
    expected = softmax(field[:, m:m + grid.height, m:m + grid.width].copy(), axis=0)
    assert (blender.class_id == expected.argmax(axis=0)).all()
    np.testing.assert_allclose(blender.probability, expected.max(axis=0), rtol=0, atol=1e-5)


def test_blend_is_the_weighted_mean_of_the_covering_windows() -> None:
    """Random, disagreeing windows: each pixel gets sum(w * logits) / sum(w) of the windows over it, computed
    here pixel by pixel; where one window alone covers a pixel, that window's own prediction."""
    grid = TileGrid.from_overlap(40, 24, 16, 0.5)  # stride 8, margin 4
    rng = np.random.default_rng(1)
    logits = {(r, c): rng.normal(size=(2, 16, 16)).astype(np.float32)
              for r in range(grid.n_rows) for c in range(grid.n_cols)}
    blender = LogitBlender(grid, 2)
    keys = sorted(logits)
    blender.add(np.array([k[0] for k in keys]), np.array([k[1] for k in keys]), np.stack([logits[k] for k in keys]))
    blender.finish()
    w = window_weights(16)
    s, m = grid.stride, grid.margin
    for y, x in [(0, 0), (3, 3), (5, 9), (12, 20), (23, 39), (11, 31)]:
        num, den, over = np.zeros(2), 0.0, []
        for (r, c), value in logits.items():
            i, j = y - (r * s - m), x - (c * s - m)
            if 0 <= i < 16 and 0 <= j < 16:
                num += w[i, j] * value[:, i, j]
                den += w[i, j]
                over.append(value[:, i, j])
        p = softmax((num / den)[:, None], axis=0)[:, 0]
        assert blender.class_id[y, x] == p.argmax() and blender.probability[y, x] == pytest.approx(p.max(), abs=1e-5)
        if len(over) == 1:  # the top-left corner pixels: only window (0, 0)
            assert blender.class_id[y, x] == over[0].argmax()
    # the premise of the single-window check: rows/cols 0..3 lie in window (0, 0) only
    assert all(sum(1 for (r, c) in logits if 0 <= yy - (r * s - m) < 16 and 0 <= xx - (c * s - m) < 16) == 1
               for yy in range(4) for xx in range(4))


def test_skipped_windows_and_invalid_pixels_are_nodata() -> None:
    grid = TileGrid.from_overlap(64, 64, 16, 0.0)
    field = _field(grid, 4)
    valid = np.ones((64, 64), bool)
    valid[40:44, 2:9] = False
    blender = LogitBlender(grid, 4, valid=valid)
    for r, c, value in _windows(grid, field, skip={(1, 1), (3, 0)}):
        blender.add(np.array([r]), np.array([c]), value[None])
    blender.finish()
    assert (blender.class_id[16:32, 16:32] == CLASS_NODATA).all() and (blender.class_id[48:, :16] == CLASS_NODATA).all()
    assert (blender.probability[16:32, 16:32] == FLOAT_NODATA).all()
    assert (blender.class_id[40:44, 2:9] == CLASS_NODATA).all()
    done = blender.class_id != CLASS_NODATA
    assert done.sum() == 64 * 64 - 2 * 256 - 28
    assert (blender.probability[done] >= 0.25).all()


def test_windows_out_of_order_are_refused() -> None:
    grid = TileGrid.from_overlap(64, 64, 16, 0.0)
    blender = LogitBlender(grid, 2)
    blender.add(np.array([2]), np.array([0]), np.zeros((1, 2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="row-major"):
        blender.add(np.array([1]), np.array([0]), np.zeros((1, 2, 16, 16), np.float32))


@pytest.mark.parametrize(("overlap", "rows_per_band"), [(0.5, 1), (0.5, 2), (0.75, 3), (0.0, 2)])
def test_row_bands_with_their_halo_blend_exactly_as_the_whole(overlap: float, rows_per_band: int) -> None:
    """A large raster split into bands of tile rows (the parts ``explora-geo predict`` spreads over processes):
    each band's pixel rows, blended from the windows ``grid.windows_over`` names (its halo: windows of the
    neighbouring bands that reach into it), are bit-identical to one blend of the whole raster."""
    grid = TileGrid.from_overlap(45, 53, 16, overlap)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(grid.n_rows, grid.n_cols, 3, 16, 16)).astype(np.float32)
    valid = rng.random((grid.height, grid.width)) > 0.05

    def blend(rows: tuple[int, int] | None) -> LogitBlender:
        y0, y1 = rows or (0, grid.height)
        blender = LogitBlender(grid, 3, valid=valid[y0:y1], rows=rows)
        r0, r1 = grid.windows_over(y0, y1) if rows else (0, grid.n_rows)
        for r in range(r0, r1):
            blender.add(np.full(grid.n_cols, r), np.arange(grid.n_cols), logits[r])
        blender.finish()
        return blender

    whole = blend(None)
    bands = [blend((r0 * grid.stride, min(r1 * grid.stride, grid.height)))
             for r0, r1 in grid.row_bands(rows_per_band)]
    assert len(bands) > 1 and [b.row0 for b in bands] == [r0 * grid.stride for r0, _ in grid.row_bands(rows_per_band)]
    np.testing.assert_array_equal(np.concatenate([b.class_id for b in bands]), whole.class_id)
    np.testing.assert_array_equal(np.concatenate([b.probability for b in bands]), whole.probability)
    # without the halo (only the band's own tile rows) the border rows differ: the halo is needed
    if overlap:
        r0, r1 = grid.row_bands(rows_per_band)[1]
        y0, y1 = r0 * grid.stride, min(r1 * grid.stride, grid.height)
        short = LogitBlender(grid, 3, valid=valid[y0:y1], rows=(y0, y1))
        for r in range(r0, r1):
            short.add(np.full(grid.n_cols, r), np.arange(grid.n_cols), logits[r])
        short.finish()
        assert not np.array_equal(short.probability, whole.probability[y0:y1])

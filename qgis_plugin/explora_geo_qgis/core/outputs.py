"""The products of a run written to files: what ``classify``, ``embed``, ``similarity``, ``cluster`` and
``change`` write, in one place for every front end (the QGIS algorithms and ``explora-geo predict`` write the
same files from the same :class:`~.pipeline.TileResults`).

``cog=True`` writes the rasters as Cloud-Optimized GeoTIFFs (same pixels; ``explora-geo predict`` does). Results
of a band of tile rows (``TileResults.row0`` > 0, a part of a large raster) are written where that band lies:
rasters from its first row, grid rows numbered and placed on the whole raster's grid.

Nodata everywhere: cells whose tile did not run are 255 (or -1 beyond 255 classes) in the class raster,
-9999 in float rasters, ``class_id = -1`` / NULL probabilities / status ``nodata`` in the grid. A run with no
processed tile writes valid, all-nodata files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .blending import LogitBlender
from .errors import PluginError
from .model import ModelInfo
from .pipeline import TileResults
from .products import STATUS_NODATA, STATUS_OK, STATUS_PARTIAL, Classification, attribute_columns, classify
from .writers import CLASS_NODATA, FLOAT_NODATA, write_geotiff, write_tile_grid


def _georef(results: TileResults) -> tuple[tuple[float, ...], str]:
    """The geotransform of the results' first cell row (``row0`` rows below the grid's top) and the CRS."""
    if results.geotransform is None:
        raise PluginError("the run has no georeferencing; read the raster through a RasterReader with a "
                          "geotransform.")
    x0, dx, rx, y0, ry, dy = results.geotransform
    if results.row0:
        x0, y0 = x0 + results.row0 * rx, y0 + results.row0 * dy
    return (x0, dx, rx, y0, ry, dy), results.crs_wkt


def write_classification(results: TileResults, info: ModelInfo, *, grid_path: str | Path,
                         class_path: str | Path, prob_path: str | Path, cog: bool = False) -> Classification:
    """Write the tile grid (GeoPackage), the class raster (with category names and colours) and the top-class
    probability raster of a classifier run (``cog``: as Cloud-Optimized GeoTIFFs); returns the classification."""
    result = classify(results.outputs["probabilities"], results.ran, results.valid_fraction)
    gt, wkt = _georef(results)
    write_tile_grid(grid_path, results.geotransform, wkt,
                    attribute_columns(result, info.class_names, results.valid_fraction, row0=results.row0),
                    row0=results.row0)
    write_geotiff(class_path, result.class_id[None], gt, wkt, nodata=result.nodata_id, descriptions=["class"],
                  class_names=info.class_names, class_colors=info.class_colors, cog=cog)
    write_geotiff(prob_path, result.probability[None].astype(np.float32), gt, wkt, nodata=FLOAT_NODATA,
                  descriptions=["probability"], cog=cog)
    return result


def write_embedding(results: TileResults, path: str | Path, cog: bool = False) -> Path:
    """Write the per-cell embeddings as a D-band float32 GeoTIFF (``emb_000 ...``; ``cog``: Cloud-Optimized)."""
    bands = np.moveaxis(results.outputs["embedding"], -1, 0).astype(np.float32)  # [D, R, K]
    bands[:, ~results.ran] = FLOAT_NODATA
    gt, wkt = _georef(results)
    return write_geotiff(path, bands, gt, wkt, nodata=FLOAT_NODATA,
                         descriptions=[f"emb_{i:03d}" for i in range(bands.shape[0])], cog=cog)


def write_segmentation(blender: LogitBlender, info: ModelInfo, geotransform: tuple[float, ...], crs_wkt: str, *,
                       class_path: str | Path, prob_path: str | Path | None = None, cog: bool = False) -> Path:
    """Write a segmenter's blended map (``blender``, finished) as a class raster at the model's GSD (category
    names and colour table of ``info``'s classes) and, when ``prob_path`` is given, its top-class probability.

    Args:
        geotransform: GDAL geotransform of the working raster (one pixel per model pixel); the blender's first
            output row (``blender.row0``) is placed where it lies on it.
        cog: Cloud-Optimized GeoTIFFs.
    """
    x0, dx, rx, y0, ry, dy = geotransform
    if blender.row0:
        x0, y0 = x0 + blender.row0 * rx, y0 + blender.row0 * dy
    gt = (x0, dx, rx, y0, ry, dy)
    write_geotiff(class_path, blender.class_id[None], gt, crs_wkt, nodata=blender.nodata_id, descriptions=["class"],
                  class_names=info.class_names, class_colors=info.class_colors, cog=cog)
    if prob_path:
        write_geotiff(prob_path, blender.probability[None], gt, crs_wkt, nodata=FLOAT_NODATA,
                      descriptions=["probability"], cog=cog)
    return Path(class_path)


def write_float_map(results: TileResults, values: np.ndarray, path: str | Path, description: str) -> Path:
    """Write a per-cell ``[R, K]`` float map (NaN or skipped tiles -> -9999) as a one-band GeoTIFF."""
    out = np.where(results.ran & np.isfinite(values), values, FLOAT_NODATA).astype(np.float32)
    gt, wkt = _georef(results)
    return write_geotiff(path, out[None], gt, wkt, nodata=FLOAT_NODATA, descriptions=[description])


def write_class_map(results: TileResults, labels: np.ndarray, path: str | Path, class_names: Sequence[str],
                    class_colors: Sequence[str], description: str = "class") -> Path:
    """Write per-cell class ids ``[R, K]`` (-1, or a cell whose tile did not run, = no class) as a class raster
    with category names and a colour table: uint8 with nodata 255, or int16 with nodata -1 beyond 255 classes."""
    dtype, nodata = (np.uint8, CLASS_NODATA) if len(class_names) < CLASS_NODATA else (np.int16, -1)
    out = np.where(results.ran & (labels >= 0), labels, nodata).astype(dtype)
    gt, wkt = _georef(results)
    return write_geotiff(path, out[None], gt, wkt, nodata=nodata, descriptions=[description],
                         class_names=class_names, class_colors=class_colors)


def write_change(before: TileResults, after: TileResults, score: np.ndarray, path: str | Path,
                 grid_path: str | Path | None = None) -> Path:
    """Write the per-cell change ``score`` ``[R, K]`` (NaN = nodata in either date) as a float32 GeoTIFF and,
    optionally, a tile grid GeoPackage with ``tile_row``, ``tile_col``, ``change`` (NULL = nodata),
    ``valid_frac_before``, ``valid_frac_after`` and ``status`` (``ok``, ``partial`` in either date, ``nodata``)."""
    both = before.ran & after.ran & np.isfinite(score)
    gt, wkt = _georef(before)
    if grid_path is not None:
        rows, cols = np.indices(score.shape)
        full = (before.valid_fraction >= 1.0) & (after.valid_fraction >= 1.0)
        write_tile_grid(grid_path, gt, wkt, {
            "tile_row": rows.astype(np.int32), "tile_col": cols.astype(np.int32),
            "change": np.where(both, score, np.nan).astype(np.float32),
            "valid_frac_before": before.valid_fraction.astype(np.float32),
            "valid_frac_after": after.valid_fraction.astype(np.float32),
            "status": np.where(~both, STATUS_NODATA, np.where(full, STATUS_OK, STATUS_PARTIAL)).astype(object)})
    out = np.where(both, score, FLOAT_NODATA).astype(np.float32)
    return write_geotiff(path, out[None], gt, wkt, nodata=FLOAT_NODATA, descriptions=["change_score"])

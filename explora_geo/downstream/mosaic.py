"""Labelled mosaics: where a mosaic's bands live, reading/writing chip windows, vector labels -> chips.

A mosaic is a multi-band GeoTIFF (band names from its descriptions or a ``file_bands`` naming), a folder of
one-band files named like Sentinel-2 products (``*_B02.jp2``, ``*_B8A.tif``), or a mapping band -> file.
Vector labels (points or polygons with a class column, any CRS, read with geopandas) become chips of a
chip folder (:func:`vector_labels_to_chips`; see :mod:`explora_geo.downstream.labeled`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from explora_geo.atomic import atomic_paths
from explora_geo.downstream.labeled import ChipIndex, resolve_file_bands
from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import canonical_band_name, select_bands

__all__ = [
    "MosaicGrid",
    "mosaic_bands",
    "mosaic_grid",
    "read_window",
    "write_geotiff",
    "read_vector_labels",
    "class_folder_name",
    "labelled_mosaic",
    "open_bands",
    "vector_labels_to_chips",
]


_S2_FILE = re.compile(r"_(B\d{1,2}A?)\.(jp2|tif|tiff)$", re.IGNORECASE)


def mosaic_bands(
    source: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    file_bands: str | Sequence[str] | None = None,
) -> dict[str, tuple[Path, int]]:
    """Where each band of a mosaic lives: ``{band name: (file, 1-based band index)}``.

    Args:
        source: a multi-band raster file (band names from its descriptions or ``file_bands``); a folder of
            one-band files named like Sentinel-2 products (``*_B02.jp2``, ``*_B8A.tif``); or a mapping of
            band name to one-band file.
        file_bands: band naming for a multi-band file without descriptions (see :func:`resolve_file_bands`).
    """
    if isinstance(source, Mapping):
        return {canonical_band_name(k): (Path(v), 1) for k, v in source.items()}
    path = Path(source)
    if path.is_dir():
        found = {}
        for f in sorted(path.iterdir()):
            match = _S2_FILE.search(f.name)
            if match:
                found[canonical_band_name(match.group(1))] = (f, 1)
        if not found:
            raise ExploraGeoError(f"folder {path} has no band files named like *_B02.jp2 / *_B8A.tif; pass a "
                                  "multi-band GeoTIFF or a folder of Sentinel-2 band files.")
        return found
    if not path.is_file():
        raise ExploraGeoError(f"raster {path} does not exist; pass a GeoTIFF mosaic or a folder of band files.")
    names = resolve_file_bands(file_bands, path)
    return {canonical_band_name(n): (path, i + 1) for i, n in enumerate(names)}


class MosaicGrid(NamedTuple):
    """Common CRS, output resolution (CRS units per pixel) and extent ``(left, bottom, right, top)`` of the
    bands of a mosaic."""

    crs: Any
    res: float
    bounds: tuple[float, float, float, float]


def mosaic_grid(layout: Mapping[str, tuple[Path, int]], names: Sequence[str],
                res: float | None = None) -> MosaicGrid:
    """The CRS, resolution (default: the finest band's) and the extent every band in ``names`` covers.

    Raises:
        ExploraGeoError: bands in different CRSs.
    """
    import rasterio

    boxes = {}
    crs = None
    for name in names:
        with rasterio.open(layout[name][0]) as src:
            crs = src.crs if crs is None else crs
            if src.crs != crs:
                raise ExploraGeoError(f"band {name} ({layout[name][0]}) is in {src.crs}, not {crs} like band "
                                      f"{names[0]}; reproject the mosaic to one CRS first.")
            boxes[name] = (src.bounds, abs(src.transform.a))
    bounds = (max(b.left for b, _ in boxes.values()), max(b.bottom for b, _ in boxes.values()),
              min(b.right for b, _ in boxes.values()), min(b.top for b, _ in boxes.values()))
    return MosaicGrid(crs, float(res) if res is not None else min(r for _, r in boxes.values()), bounds)


def read_window(handles: Mapping[str, Any], layout: Mapping[str, tuple[Path, int]], names: Sequence[str],
                x0: float, y1: float, size: int, res: float) -> np.ndarray:
    """``[C, size, size]`` pixels of bands ``names`` over the square with top-left corner ``(x0, y1)`` (CRS
    units) at resolution ``res``; coarser bands are resampled bilinearly. ``handles``: open datasets."""
    from rasterio.enums import Resampling
    from rasterio.windows import from_bounds

    span = size * res
    return np.stack([
        handles[n].read(layout[n][1], out_shape=(size, size), resampling=Resampling.bilinear,
                        window=from_bounds(x0, y1 - span, x0 + span, y1, transform=handles[n].transform))
        for n in names
    ])


def write_geotiff(path: Path, data: np.ndarray, crs: Any, x0: float, y1: float, res: float,
                  names: Sequence[str] | None = None) -> Path:
    """Write ``data`` ``[C, H, W]`` as a GeoTIFF with top-left ``(x0, y1)``, atomically (temp name, rename)."""
    import rasterio
    from rasterio.transform import from_origin

    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=from_origin(x0, y1, res, res))
    with atomic_paths(path) as (tmp,), rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        if names is not None:
            dst.descriptions = tuple(names)
    return path


def read_vector_labels(vector: str | os.PathLike[str], class_column: str, layer: str | None = None) -> Any:
    """The features of a vector file that have a geometry and a ``class_column`` value (a GeoDataFrame).

    Raises:
        ExploraGeoError: missing file, missing class column (listing the columns), no CRS, no usable feature.
    """
    import geopandas as gpd

    path = Path(vector)
    if not path.exists():
        raise ExploraGeoError(f"vector label file {path} does not exist.")
    gdf = gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    if class_column not in gdf.columns:
        columns = [c for c in gdf.columns if c != gdf.geometry.name]
        raise ExploraGeoError(f"{path} has no class column {class_column!r}; its columns are "
                              f"{', '.join(map(str, columns))}; pass one of them as the class column.")
    if gdf.crs is None:
        raise ExploraGeoError(f"{path} has no CRS; set one (e.g. with ogr2ogr -a_srs) so labels can be placed.")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty & gdf[class_column].notna()]
    if len(gdf) == 0:
        raise ExploraGeoError(f"{path} has no features with a geometry and a {class_column!r} value.")
    return gdf


def class_folder_name(value: Any) -> str:
    """A class value as a safe folder name (``3.0`` -> ``"3"``, ``"Forest, dense"`` -> ``"Forest_dense"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = re.sub(r"[^\w.-]+", "_", str(value)).strip("._")
    return name or "class"


def labelled_mosaic(
    vector: str | os.PathLike[str],
    raster: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    class_column: str,
    *,
    res: float | None = None,
    bands: Sequence[str] | None = None,
    file_bands: str | Sequence[str] | None = None,
    layer: str | None = None,
) -> tuple[Any, dict[str, tuple[Path, int]], list[str], MosaicGrid]:
    """Vector labels over a mosaic: ``(labels, layout, names, grid)``.

    ``labels``: the usable features (:func:`read_vector_labels`), reprojected to the mosaic's CRS;
    ``layout``: where each band lives (:func:`mosaic_bands`); ``names``: the bands to read, ``bands`` picked
    by name (default: all, in the mosaic's order); ``grid``: their :func:`mosaic_grid` at resolution ``res``.
    """
    gdf = read_vector_labels(vector, class_column, layer)
    layout = mosaic_bands(raster, file_bands)
    names = list(layout) if bands is None else [list(layout)[i] for i in select_bands(list(layout), bands,
                                                                                       source=str(raster))]
    grid = mosaic_grid(layout, names, res)
    return gdf.to_crs(grid.crs), layout, names, grid


@contextmanager
def open_bands(layout: Mapping[str, tuple[Path, int]], names: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Open datasets of bands ``names`` (for :func:`read_window`), closed when the ``with`` block ends."""
    import rasterio

    with ExitStack() as stack:
        yield {name: stack.enter_context(rasterio.open(layout[name][0])) for name in names}


def vector_labels_to_chips(
    vector: str | os.PathLike[str],
    raster: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    class_column: str,
    chip_size: int = 64,
    res: float | None = None,
    bands: Sequence[str] | None = None,
    file_bands: str | Sequence[str] | None = None,
    layer: str | None = None,
    skip_outside: bool = False,
) -> ChipIndex:
    """Cut one chip per labelled point or polygon out of a mosaic, into a chip folder.

    Each feature gives a ``chip_size`` x ``chip_size`` chip centred on the point (or on the polygon's
    representative point, which lies inside it), at ground resolution ``res`` (metres per pixel in the
    raster's CRS; default: the finest band). Labels may be in any CRS: they are reprojected to the raster's.
    Bands of coarser resolution are resampled bilinearly. Chips are written as
    ``out_dir/<class>/<class>_<feature index>.tif`` with band descriptions, CRS and transform, each written
    to a temporary name and then renamed.

    Args:
        vector: any file geopandas reads (GeoPackage, shapefile, GeoJSON, ...).
        raster: the mosaic; see :func:`mosaic_bands`.
        out_dir: the chip folder to create / fill.
        class_column: attribute holding the class of each feature.
        chip_size: chip height and width in pixels.
        res: output resolution in CRS units per pixel.
        bands: bands to write (default: all bands of the mosaic, in its order).
        file_bands: band naming of a multi-band raster without descriptions.
        layer: layer of a multi-layer vector file.
        skip_outside: skip features whose chip is not fully inside the raster instead of failing.

    Returns:
        The index of the written chips.

    Raises:
        ExploraGeoError: missing class column; labels outside the raster (naming the feature indices);
            fewer than two classes; a requested band missing from the mosaic.
    """
    if chip_size < 1:
        raise ExploraGeoError(f"chip size {chip_size} must be a positive number of pixels.")
    gdf, layout, names, (crs, res, (left, bottom, right, top)) = labelled_mosaic(
        vector, raster, class_column, res=res, bands=bands, file_bands=file_bands, layer=layer)
    half = chip_size * res / 2.0
    centres = [g if g.geom_type == "Point" else g.representative_point() for g in gdf.geometry]
    windows, outside = [], []
    for pos, c in enumerate(centres):
        x0, y1 = c.x - half, c.y + half
        if x0 < left or c.y - half < bottom or c.x + half > right or y1 > top:
            outside.append(pos)
        else:
            windows.append((pos, x0, y1))
    if outside and not skip_outside:
        shown = ", ".join(str(gdf.index[p]) for p in outside[:10]) + (" ..." if len(outside) > 10 else "")
        raise ExploraGeoError(
            f"{len(outside)} of {len(gdf)} labels in {vector} have chips ({chip_size} px at {res:g} m) not fully "
            f"inside the raster (features {shown}); fix those labels or skip them (skip_outside / --skip-outside)."
        )
    if not windows:
        raise ExploraGeoError(f"no label of {vector} has a chip inside the raster {raster}; check that they "
                              "overlap.")
    classes = sorted({class_folder_name(gdf[class_column].iloc[p]) for p, _, _ in windows})
    if len(classes) < 2:
        raise ExploraGeoError(f"the labels inside the raster have a single class ({classes[0]}) in column "
                              f"{class_column!r}; classification needs at least two.")

    out = Path(out_dir)
    paths: list[Path] = []
    labels: list[int] = []
    with open_bands(layout, names) as handles:
        for pos, x0, y1 in windows:
            cls = class_folder_name(gdf[class_column].iloc[pos])
            chip = read_window(handles, layout, names, x0, y1, chip_size, res)
            paths.append(write_geotiff(out / cls / f"{cls}_{gdf.index[pos]}.tif", chip, crs, x0, y1, res, names))
            labels.append(classes.index(cls))
    return ChipIndex(tuple(paths), tuple(labels), tuple(classes))

"""Writers for the per-tile outputs: GeoTIFF rasters and a GeoPackage grid, via GDAL/OGR (``osgeo``).

Rasters are tiled, DEFLATE-compressed GeoTIFFs; with ``cog=True`` (``explora-geo predict``) they are
Cloud-Optimized GeoTIFFs (GDAL's COG driver: tiled, overviews, IFDs first), the same pixels, georeferencing,
category names and colour table. :func:`write_cog` turns any GDAL raster (a GeoTIFF, a VRT over parts) into one.

Every writer writes to a hidden temporary name in the destination folder and renames it into place only when
complete (``os.replace``), so a failure or a cancel never leaves a half-written output.
"""

from __future__ import annotations

import binascii
import contextlib
import csv
import io
import os
import re
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import PluginError

CLASS_NODATA = 255
FLOAT_NODATA = -9999.0


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix); on success rename it (and GDAL's ``.aux.xml`` side
    file, if any) to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # GDAL drivers want to create the file themselves
    try:
        yield tmp
        if os.path.exists(f"{tmp}.aux.xml"):  # GDAL's side file (category names, statistics)
            os.replace(f"{tmp}.aux.xml", f"{path}.aux.xml")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm", f"{tmp}.aux.xml"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _gdal() -> tuple[object, object, object]:
    try:
        from osgeo import gdal, ogr, osr
    except ImportError as err:  # QGIS always ships osgeo; a bare Python may not
        raise PluginError("GDAL's Python bindings (osgeo) are missing; run this inside QGIS's Python.") from err
    gdal.UseExceptions()
    ogr.UseExceptions()
    return gdal, ogr, osr


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` -> ``(r, g, b)`` in 0..255."""
    value = color.lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", value):
        raise PluginError(f"class colour {color!r} is not '#rrggbb'; fix class_colors in the model metadata.")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def write_geotiff(
    path: str | Path,
    bands: np.ndarray,
    geotransform: Sequence[float],
    crs_wkt: str,
    *,
    nodata: float | None = None,
    descriptions: Sequence[str] = (),
    class_names: Sequence[str] = (),
    class_colors: Sequence[str] = (),
    cog: bool = False,
) -> Path:
    """Write ``bands`` ``[B, H, W]`` (uint8, int16, int32 or float32) as a tiled, compressed GeoTIFF.

    Args:
        path: destination ``.tif``.
        geotransform: GDAL geotransform (origin and pixel size in CRS units).
        crs_wkt: the CRS as WKT.
        nodata: nodata value of every band.
        descriptions: one description per band.
        class_names, class_colors: for a single-band class raster, category names and a colour table.
        cog: write a Cloud-Optimized GeoTIFF (see :func:`write_cog`; class rasters get MODE overviews).
    """
    gdal, _, _ = _gdal()
    types = {np.dtype(np.uint8): gdal.GDT_Byte, np.dtype(np.int16): gdal.GDT_Int16,
             np.dtype(np.int32): gdal.GDT_Int32, np.dtype(np.float32): gdal.GDT_Float32}
    if bands.ndim != 3 or bands.dtype not in types:
        raise ValueError(f"bands must be [B, H, W] of {sorted(map(str, types))}, got {bands.shape} {bands.dtype}")
    n, h, w = bands.shape
    options = ["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"]
    if n > 1:
        options.append("INTERLEAVE=BAND")
    if cog:  # the GeoTIFF as a hidden temporary, then its COG copy into place
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, plain = tempfile.mkstemp(prefix=f".{Path(path).stem}.", suffix=".plain.tif", dir=Path(path).parent)
        os.close(fd)
        try:
            write_geotiff(plain, bands, geotransform, crs_wkt, nodata=nodata, descriptions=descriptions,
                          class_names=class_names, class_colors=class_colors)
            return write_cog(plain, path, categorical=bool(class_names))
        finally:
            for leftover in (plain, f"{plain}.aux.xml"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    with atomic_path(path) as tmp:
        ds = gdal.GetDriverByName("GTiff").Create(tmp, w, h, n, types[bands.dtype], options)
        ds.SetGeoTransform(tuple(float(v) for v in geotransform))
        ds.SetProjection(crs_wkt)
        for i in range(n):
            band = ds.GetRasterBand(i + 1)
            if nodata is not None:
                band.SetNoDataValue(float(nodata))
            if i < len(descriptions):
                band.SetDescription(str(descriptions[i]))
            band.WriteArray(bands[i])
        if class_names:
            band = ds.GetRasterBand(1)
            band.SetCategoryNames([str(c) for c in class_names])
            table = gdal.ColorTable()
            for k, color in enumerate(class_colors):
                table.SetColorEntry(k, (*hex_to_rgb(color), 255))
            band.SetColorTable(table)
            band.SetColorInterpretation(gdal.GCI_PaletteIndex)
        ds.FlushCache()
        ds = None
    return Path(path)


def write_cog(source: str | Path, path: str | Path, *, categorical: bool = False) -> Path:
    """Copy the raster ``source`` (any GDAL dataset: a GeoTIFF, a VRT mosaic of parts) to ``path`` as a
    Cloud-Optimized GeoTIFF, atomically: DEFLATE, 512 px tiles, overviews down to one tile (``MODE`` resampling
    for class rasters, so an overview pixel is a class that occurs under it, else ``AVERAGE``; nodata is left
    out of both). Nodata and the colour table go into the file, band descriptions and category names into its
    ``.aux.xml`` (as for any GeoTIFF). Pixel values and georeferencing are those of ``source``."""
    gdal, _, _ = _gdal()
    options = ["COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER", "OVERVIEWS=AUTO",
               f"RESAMPLING={'MODE' if categorical else 'AVERAGE'}"]
    with atomic_path(path) as tmp:
        ds = gdal.Translate(tmp, str(source), format="COG", creationOptions=options)
        if ds is None:
            raise PluginError(f"GDAL could not write the Cloud-Optimized GeoTIFF {path}; check the folder is "
                              "writable.")
        ds = None
    return Path(path)


def mosaic_rows(parts: Sequence[tuple[str | Path, int]], path: str | Path) -> Path:
    """Stack raster parts that are bands of rows of one raster into the Cloud-Optimized GeoTIFF ``path``.

    Args:
        parts: ``(file, first_row)`` per part, each part as wide as the whole, together covering its rows (e.g.
            the per-rank parts of ``explora-geo predict``). The first part's georeferencing, data type, nodata,
            band descriptions, colour table and category names are the whole raster's, its top-left corner the
            whole's; each part's pixels are copied unchanged to its ``first_row`` (integer offsets, no
            resampling).
    """
    gdal, _, _ = _gdal()
    parts = sorted(((str(f), int(r)) for f, r in parts), key=lambda p: p[1])
    first = gdal.Open(parts[0][0])
    bands = [first.GetRasterBand(i + 1) for i in range(first.RasterCount)]
    names = [b.GetDescription() for b in bands]  # (reading a description first loads GDAL's side file)
    categories, table = bands[0].GetCategoryNames(), bands[0].GetColorTable()
    nodata, dtype = bands[0].GetNoDataValue(), bands[0].DataType
    width = first.RasterXSize
    height = 0
    for file, row in parts:
        ds = gdal.Open(file)
        if ds.RasterXSize != width or ds.RasterCount != len(bands):
            raise PluginError(f"raster part {file} is {ds.RasterXSize} px wide with {ds.RasterCount} bands, not "
                              f"{width} px with {len(bands)} like {parts[0][0]}; delete the parts and rerun.")
        height = max(height, row + ds.RasterYSize)
        ds = None
    options = ["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"] + (["INTERLEAVE=BAND"] if len(bands) > 1 else [])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, plain = tempfile.mkstemp(prefix=f".{Path(path).stem}.", suffix=".mosaic.tif", dir=Path(path).parent)
    os.close(fd)
    try:
        out = gdal.GetDriverByName("GTiff").Create(plain, width, height, len(bands), dtype, options)
        out.SetGeoTransform(first.GetGeoTransform())
        out.SetProjection(first.GetProjection())
        for i, band in enumerate(out.GetRasterBand(k + 1) for k in range(len(bands))):
            if nodata is not None:
                band.SetNoDataValue(nodata)
            band.SetDescription(names[i])
        if table is not None:
            out.GetRasterBand(1).SetColorTable(table)
            out.GetRasterBand(1).SetColorInterpretation(gdal.GCI_PaletteIndex)
        if categories:
            out.GetRasterBand(1).SetCategoryNames(list(categories))
        for file, row in parts:
            ds = gdal.Open(file)
            for k in range(len(bands)):
                out.GetRasterBand(k + 1).WriteArray(ds.GetRasterBand(k + 1).ReadAsArray(), 0, row)
            ds = None
        out.FlushCache()
        out = first = bands = None
        return write_cog(plain, path, categorical=bool(categories))
    finally:
        for leftover in (plain, f"{plain}.aux.xml"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def merge_tile_grids(parts: Sequence[str | Path], path: str | Path, layer_name: str = "tiles") -> Path:
    """Append the GeoPackage grids ``parts`` (same fields, in order) into one GeoPackage ``path``, atomically:
    features keep their attributes and geometries, fids run on in the parts' order."""
    gdal, _, _ = _gdal()
    with atomic_path(path) as tmp:
        for k, part in enumerate(parts):
            options = gdal.VectorTranslateOptions(
                format="GPKG", layerName=layer_name, accessMode=None if k == 0 else "append",
                layerCreationOptions=["SPATIAL_INDEX=YES", "FID=fid"] if k == 0 else None)
            result = gdal.VectorTranslate(tmp, str(part), options=options)
            if result is None:
                raise PluginError(f"GDAL could not append the tile grid part {part} to {path}; delete the parts "
                                  "and rerun.")
            result = None
    return Path(path)


def field_name(label: str, taken: set[str]) -> str:
    """A GeoPackage-safe, unique field name ``p_<label>`` for a class's probability."""
    base = "p_" + (re.sub(r"[^0-9A-Za-z_]+", "_", label).strip("_").lower() or "class")
    name, i = base[:60], 2
    while name in taken:
        name, i = f"{base[:56]}_{i}", i + 1
    taken.add(name)
    return name


def polygon_hex_wkb(geotransform: Sequence[float], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Hex WKB (little-endian) of the rectangles of cells ``(rows[i], cols[i])`` of a north-up grid:
    ``[N]`` str."""
    x0, dx, _, y0, _, dy = geotransform
    left, top = x0 + cols * dx, y0 + rows * dy
    right, bottom = left + dx, top + dy
    record = np.dtype([("order", "u1"), ("type", "<u4"), ("rings", "<u4"), ("points", "<u4"),
                       ("xy", "<f8", (10,))])
    wkb = np.zeros(len(rows), dtype=record)
    wkb["order"], wkb["type"], wkb["rings"], wkb["points"] = 1, 3, 1, 5
    wkb["xy"] = np.stack([left, top, right, top, right, bottom, left, bottom, left, top], axis=1)
    hexed = binascii.hexlify(wkb.tobytes())
    return np.frombuffer(hexed, dtype=f"S{2 * record.itemsize}").astype(str)


def write_tile_grid(
    path: str | Path,
    geotransform: Sequence[float],
    crs_wkt: str,
    columns: dict[str, np.ndarray],
    *,
    layer_name: str = "tiles",
    where: np.ndarray | None = None,
    row0: int = 0,
) -> Path:
    """Write one polygon per output cell to a GeoPackage, with one attribute per entry of ``columns``.

    The rows are formatted in bulk as an in-memory CSV (hex WKB geometry + typed columns) that GDAL converts to
    the GeoPackage in C (``gdal.VectorTranslate``), which is an order of magnitude faster than creating
    features one by one from Python.

    Args:
        path: destination ``.gpkg`` (replaced if it exists).
        geotransform: the cell grid's GDAL geotransform (north-up).
        crs_wkt: the CRS as WKT.
        columns: field name -> ``[R, K]`` array (int, float or str values; NaN floats become NULL).
        layer_name: GeoPackage layer name.
        where: ``[R, K]`` bool; only these cells are written (all when ``None``).
        row0: grid row of the columns' first row (a band of a larger grid: polygons where that band lies).
    """
    gdal, _, _ = _gdal()
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    shape = next(iter(arrays.values())).shape
    rows, cols = np.nonzero(np.ones(shape, bool) if where is None else where)
    names, types, values = ["WKB"], ['"WKT"'], [polygon_hex_wkb(geotransform, rows + row0, cols)]
    for name, array in arrays.items():
        picked = array[rows, cols]
        if array.dtype.kind in "iub":
            types.append('"Integer64"' if array.dtype.itemsize > 4 else '"Integer"')
            values.append(picked.astype(np.int64).astype(str))
        elif array.dtype.kind == "f":
            types.append('"Real"')
            # float32 values print with their own (shortest round-trip) precision
            picked = picked if picked.dtype in (np.float32, np.float64) else picked.astype(np.float64)
            values.append(np.where(np.isfinite(picked), picked.astype(str), ""))
        else:
            types.append('"String"')
            values.append(picked.astype(str))
        names.append(name)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    writer.writerows(zip(*(v.tolist() for v in values)))
    stem = f"/vsimem/explora_geo_{uuid.uuid4().hex}"
    gdal.FileFromMemBuffer(f"{stem}.csv", buffer.getvalue().encode("utf-8"))
    gdal.FileFromMemBuffer(f"{stem}.csvt", ",".join(types).encode("ascii"))
    try:
        with atomic_path(path) as tmp:
            options = gdal.VectorTranslateOptions(
                format="GPKG", layerName=layer_name, geometryType="POLYGON", srcSRS=crs_wkt, dstSRS=crs_wkt,
                layerCreationOptions=["SPATIAL_INDEX=YES", "FID=fid"])
            source = gdal.OpenEx(f"{stem}.csv", gdal.OF_VECTOR,
                                 open_options=["GEOM_POSSIBLE_NAMES=WKB", "KEEP_GEOM_COLUMNS=NO"])
            result = gdal.VectorTranslate(tmp, source, options=options)
            if result is None:
                raise PluginError(f"GDAL could not write the tile grid {path}; check the folder is writable.")
            result = source = None
    finally:
        gdal.Unlink(f"{stem}.csv")
        gdal.Unlink(f"{stem}.csvt")
    return Path(path)

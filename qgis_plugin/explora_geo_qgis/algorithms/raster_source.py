"""Read a QGIS raster layer on the model's grid: the QGIS side of the inference core's ``Reader``.

The working grid is the processing area resampled to the model's GSD, in the layer's CRS when it is
projected, or in the UTM zone of the area's centre when the layer is geographic (degrees). Pixels are read
through the layer's data provider (a clone, so the reader thread owns it), reprojected by a
``QgsRasterProjector`` when needed. A pixel is valid when it lies inside the layer, inside the mask polygons
(if any), and no model band is nodata there by the provider's own rules, applied in numpy on integer and float
bands alike (``core.reader.NodataRule``): NaN/inf, the source nodata value when the layer uses it, the layer's
user no-data ranges (Layer Properties > Transparency), and the algorithm's extra ``NODATA`` value. (QGIS marks
user no-data in a per-pixel bitmap that Python cannot read in bulk and that ``QgsRasterProjector`` drops, so
the rules are applied to the values instead.) A block the provider or projector cannot deliver (an empty
block at the edge of a reprojected area) counts as invalid pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRasterProjector,
    QgsRasterRange,
    QgsRectangle,
    QgsUnitTypes,
)

from ..core.errors import PluginError
from ..core.reader import NodataRange, NodataRule, RasterReader
from .compat import METERS, RESAMPLE_AVERAGE, RESAMPLE_BILINEAR

# Qgis.DataType values (stable since QGIS 3.0) -> numpy dtypes
_DTYPES = {1: np.uint8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.float64}


def utm_crs_for(lon: float, lat: float) -> QgsCoordinateReferenceSystem:
    """The WGS 84 / UTM zone CRS containing ``(lon, lat)`` (degrees)."""
    zone = min(60, max(1, math.floor((lon + 180.0) / 6.0) + 1))
    return QgsCoordinateReferenceSystem(f"EPSG:{(32600 if lat >= 0 else 32700) + zone}")


def working_crs(layer: QgsRasterLayer, area_in_layer_crs: QgsRectangle) -> QgsCoordinateReferenceSystem:
    """The layer's CRS if projected, else the UTM zone of the area's centre."""
    crs = layer.crs()
    if not crs.isGeographic():
        return crs
    to_wgs84 = QgsCoordinateTransform(crs, QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    centre = to_wgs84.transform(area_in_layer_crs.center())
    return utm_crs_for(centre.x(), centre.y())


@dataclass
class WorkingGrid:
    """The model-resolution pixel grid being processed.

    Attributes:
        crs: working CRS.
        x0, y0: top-left corner, CRS units.
        pixel: pixel size, CRS units (the model's GSD converted from metres).
        width, height: pixels.
    """

    crs: QgsCoordinateReferenceSystem
    x0: float
    y0: float
    pixel: float
    width: int
    height: int

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        return (self.x0, self.pixel, 0.0, self.y0, 0.0, -self.pixel)

    def window_extent(self, r0: int, r1: int, c0: int, c1: int) -> QgsRectangle:
        return QgsRectangle(self.x0 + c0 * self.pixel, self.y0 - r1 * self.pixel,
                            self.x0 + c1 * self.pixel, self.y0 - r0 * self.pixel)


def make_grid(crs: QgsCoordinateReferenceSystem, area: QgsRectangle, gsd_m: float) -> WorkingGrid:
    """Grid of ``gsd_m``-metre pixels covering ``area`` (in ``crs``)."""
    factor = QgsUnitTypes.fromUnitToUnitFactor(METERS, crs.mapUnits())
    pixel = gsd_m * factor
    width, height = math.ceil(area.width() / pixel - 1e-6), math.ceil(area.height() / pixel - 1e-6)
    return WorkingGrid(crs, area.xMinimum(), area.yMaximum(), pixel, max(width, 0), max(height, 0))


def nodata_rule(provider: QgsRasterDataProvider, band: int, extra: float | None = None) -> NodataRule:
    """The no-data rule of a layer band: source nodata (when used), user no-data ranges, ``extra``."""
    values = []
    if provider.sourceHasNoDataValue(band) and provider.useSourceNoDataValue(band):
        values.append(float(provider.sourceNoDataValue(band)))
    ranges = []
    for span in provider.userNoDataValues(band):
        bounds = span.bounds()
        ranges.append(NodataRange(float(span.min()), float(span.max()),
                                  include_min=bounds in (QgsRasterRange.IncludeMinAndMax, QgsRasterRange.IncludeMin),
                                  include_max=bounds in (QgsRasterRange.IncludeMinAndMax, QgsRasterRange.IncludeMax)))
    return NodataRule(tuple(values), tuple(ranges)).with_value(extra)


class LayerReader(RasterReader):
    """The engine's :class:`~..core.reader.RasterReader` over a QGIS raster layer.

    Args:
        layer: the raster layer.
        bands: 1-based layer band numbers, in model band order.
        grid: the working grid.
        nodata: a nodata value for every band, used in addition to the layer's own.
        mask_wkts: polygons (WKT, in the working CRS); pixels outside them are invalid.

    Raises:
        PluginError: a model band whose data type the engine cannot read (e.g. complex or ARGB).
    """

    def __init__(self, layer: QgsRasterLayer, bands: list[int], grid: WorkingGrid, *, nodata: float | None = None,
                 mask_wkts: list[str] | None = None) -> None:
        provider: QgsRasterDataProvider = layer.dataProvider().clone()
        self._provider = provider
        try:
            provider.enableProviderResampling(True)
            provider.setZoomedInResamplingMethod(RESAMPLE_BILINEAR)
            provider.setZoomedOutResamplingMethod(RESAMPLE_AVERAGE)
        except AttributeError:  # providers without resampling support read nearest-neighbour
            pass
        self.bands = bands
        self.grid = grid
        self.name = f"layer '{layer.name()}'"
        self.width, self.height, self.n_bands = grid.width, grid.height, len(bands)
        self.geotransform = grid.geotransform
        self.crs_wkt = grid.crs.toWkt()
        self.dtypes = []
        for band in bands:
            dtype = _DTYPES.get(int(provider.dataType(band)))
            if dtype is None:
                raise PluginError(f"band {band} of {self.name} has data type {int(provider.dataType(band))}, which "
                                  "the model cannot read; convert the raster to integer or float32 bands.")
            self.dtypes.append(dtype)
        floats = [d for d in self.dtypes if np.dtype(d).kind == "f"]
        self.dtype = np.result_type(*floats, np.float32) if floats else np.result_type(*self.dtypes)
        self.rules = [nodata_rule(provider, b, nodata) for b in bands]
        self.layer_extent = layer.extent()
        self.reprojected = layer.crs() != grid.crs
        self.source = provider
        self._to_layer = None
        if self.reprojected:
            projector = QgsRasterProjector()
            projector.setInput(provider)
            projector.setCrs(layer.crs(), grid.crs, QgsProject.instance().transformContext())
            self._projector = projector
            self.source = projector
            src, dst = osr.SpatialReference(), osr.SpatialReference()
            dst.ImportFromWkt(layer.crs().toWkt())
            src.ImportFromWkt(grid.crs.toWkt())
            for s in (src, dst):
                s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            self._to_layer = osr.CoordinateTransformation(src, dst)
        self._mask_layer = memory_layer(mask_wkts, grid.crs) if mask_wkts else None

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = r1 - r0, c1 - c0
        extent = self.grid.window_extent(r0, r1, c0, c1)
        data = np.zeros((len(self.bands), h, w), dtype=self.dtype)
        valid = self._inside_layer(r0, r1, c0, c1)
        for i, band in enumerate(self.bands):
            block = self.source.block(band, extent, w, h)
            dtype = self.dtypes[i]
            if not block.isValid() or block.isEmpty() or _DTYPES.get(int(block.dataType())) != dtype:
                # the projector returns an empty block for a window it cannot map (e.g. a 1-px edge row)
                valid[:] = False
                continue
            # a view of the block's buffer: used only while `block` is alive, copied into `data` right away
            values = np.frombuffer(block.data(), dtype=dtype).reshape(h, w)
            data[i] = values
            self.rules[i].apply(values, valid)
        if self._mask_layer is not None:
            valid &= self._rasterize_mask(r0, r1, c0, c1)
        return data, valid

    def _inside_layer(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Pixels whose centre lies inside the layer's extent (reprojected when needed)."""
        g = self.grid
        xs = g.x0 + (np.arange(c0, c1) + 0.5) * g.pixel
        ys = g.y0 - (np.arange(r0, r1) + 0.5) * g.pixel
        e = self.layer_extent
        if self._to_layer is None:
            inside_x = (xs >= e.xMinimum()) & (xs <= e.xMaximum())
            inside_y = (ys >= e.yMinimum()) & (ys <= e.yMaximum())
            return inside_y[:, None] & inside_x[None, :]
        xx, yy = np.meshgrid(xs, ys)
        points = np.asarray(self._to_layer.TransformPoints(np.stack([xx.ravel(), yy.ravel()], axis=1)))
        lx, ly = points[:, 0].reshape(xx.shape), points[:, 1].reshape(xx.shape)
        return (lx >= e.xMinimum()) & (lx <= e.xMaximum()) & (ly >= e.yMinimum()) & (ly <= e.yMaximum())

    def _rasterize_mask(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        g = self.grid
        geotransform = (g.x0 + c0 * g.pixel, g.pixel, 0.0, g.y0 - r0 * g.pixel, 0.0, -g.pixel)
        return rasterize(self._mask_layer, geotransform, c1 - c0, r1 - r0)


def rasterize(source: tuple[object, object], geotransform: tuple[float, ...], width: int, height: int,
              all_touched: bool = False) -> np.ndarray:
    """``[height, width]`` bool: the pixels the geometries of ``source`` (from :func:`memory_layer`) cover."""
    ds = gdal.GetDriverByName("MEM").Create("", width, height, 1, gdal.GDT_Byte)
    ds.SetGeoTransform(tuple(geotransform))
    options = ["ALL_TOUCHED=TRUE"] if all_touched else []
    gdal.RasterizeLayer(ds, [1], source[1], burn_values=[1], options=options)
    return ds.GetRasterBand(1).ReadAsArray().astype(bool)


def memory_layer(wkts: list[str], crs: QgsCoordinateReferenceSystem) -> tuple[object, object]:
    """An OGR in-memory layer (data source, layer) holding WKT geometries in ``crs``."""
    srs = osr.SpatialReference()
    srs.ImportFromWkt(crs.toWkt())
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    ds = ogr.GetDriverByName("Memory").CreateDataSource("geometries")
    layer = ds.CreateLayer("geometries", srs, ogr.wkbUnknown)
    for wkt in wkts:
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        layer.CreateFeature(feature)
    return ds, layer

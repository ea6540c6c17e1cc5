"""Shared parameters and the tiled-inference run of the explora-geo Processing algorithms."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeatureRequest,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProcessingFeedback,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsRasterLayer,
    QgsRectangle,
)

from ..core.bands import layer_band_label, parse_mapping, resolve_bands
from ..core.errors import PluginError
from ..core.model import DEVICES, OnnxModel
from ..core.pipeline import Cancelled, RunSettings, TileConsumer, TileResults, infer
from ..core.tiling import TileGrid
from .compat import FILE_BEHAVIOR, NUMBER_DOUBLE, NUMBER_INTEGER, SOURCE_POLYGON
from .loading import OutputLayer, present_outputs
from .raster_source import LayerReader, WorkingGrid, make_grid, working_crs


@dataclass
class Run:
    """What a tiled run produced: the per-tile results, the grids and the model."""

    results: TileResults
    grid: WorkingGrid
    model: OnnxModel

    @property
    def tiles(self) -> TileGrid:
        return self.results.grid

    @property
    def cell_geotransform(self) -> tuple[float, ...]:
        return self.tiles.cell_geotransform(self.grid.geotransform)

    @property
    def crs_wkt(self) -> str:
        return self.grid.crs.toWkt()

    def stats(self) -> dict:
        """Speed and device facts every algorithm returns besides its outputs."""
        return {"TILES_RUN": self.results.tiles_run, "TILES_PARTIAL": self.results.tiles_partial,
                "TILES_SKIPPED": self.results.tiles_skipped, "TILES_PER_SECOND": self.results.tiles_per_second,
                "SECONDS": self.results.seconds, "FORWARD_SECONDS": self.results.forward_seconds,
                "EXECUTION_PROVIDER": self.model.execution_provider}


def geometries_as_wkt(source: QgsProcessingFeatureSource, crs: QgsCoordinateReferenceSystem,
                      context: QgsProcessingContext) -> list[str]:
    """The non-empty geometries of ``source``, transformed to ``crs``, as WKT."""
    transform = QgsCoordinateTransform(source.sourceCrs(), crs, context.transformContext())
    out = []
    for feature in source.getFeatures(QgsFeatureRequest().setNoAttributes()):
        geometry = feature.geometry()
        if not geometry.isEmpty():
            geometry.transform(transform)
            out.append(geometry.asWkt())
    return out


#: labels of the DEVICE choices, in the order of ``core.model.DEVICES``
DEVICE_LABELS = ("Automatic: CUDA (GPU) when ONNX Runtime offers it, else CPU", "CPU", "CUDA (GPU)")


def threads_text(threads: int) -> str:
    """``"4 threads"``, or onnxruntime's default for 0."""
    return f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"


def device_name(provider: str) -> str:
    """``"CUDAExecutionProvider"`` -> ``"GPU (CUDA)"``, ``"CPUExecutionProvider"`` -> ``"CPU"``."""
    return {"CUDAExecutionProvider": "GPU (CUDA)", "CPUExecutionProvider": "CPU"}.get(provider, provider)


class TiledModelAlgorithm(QgsProcessingAlgorithm):
    """Base of the algorithms that run an exported explora-geo model over a raster, tile by tile."""

    INPUT = "INPUT"
    MODEL = "MODEL"
    BAND_MAPPING = "BAND_MAPPING"
    EXTENT = "EXTENT"
    MASK = "MASK"
    OVERLAP = "OVERLAP"
    BATCH_SIZE = "BATCH_SIZE"
    MIN_VALID = "MIN_VALID"
    NODATA = "NODATA"
    SCALE = "SCALE"
    OFFSET = "OFFSET"
    DEVICE = "DEVICE"
    THREADS = "THREADS"

    #: set by each algorithm: its id in the provider, its name in the toolbox and its help text
    NAME: str = ""
    DISPLAY_NAME: str = ""
    HELP: str = ""

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:
        return self.DISPLAY_NAME

    def shortHelpString(self) -> str:
        return self.HELP

    def createInstance(self) -> TiledModelAlgorithm:
        return type(self)()

    def group(self) -> str:
        return "ExPLoRA models"

    def groupId(self) -> str:
        return "explora_models"

    def add_common_parameters(self, with_input: bool = True) -> None:
        """Input raster (unless ``with_input`` is False: the algorithm adds its own), model, band mapping, area,
        overlap, batch size, nodata handling, input scale, device and threads."""
        if with_input:
            self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster"))
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, "Model (.onnx exported by explora-geo)", FILE_BEHAVIOR,
            extension="onnx"))
        self.addParameter(QgsProcessingParameterString(
            self.BAND_MAPPING, "Band mapping, e.g. 'B02=2, B03=3' (empty: from band names, else by position)",
            optional=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (empty: whole layer)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.MASK, "Mask polygons (only pixels inside are used)",
            [SOURCE_POLYGON], optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.OVERLAP, "Tile overlap (% of the tile)", NUMBER_DOUBLE,
            defaultValue=0.0, minValue=0.0, maxValue=90.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.BATCH_SIZE, "Batch size (tiles per forward pass)", NUMBER_INTEGER,
            defaultValue=32, minValue=1, maxValue=4096))
        self.addParameter(QgsProcessingParameterNumber(
            self.MIN_VALID, "Minimum valid-pixel fraction of a tile (others are skipped)",
            NUMBER_DOUBLE, defaultValue=0.5, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.NODATA, "Extra nodata value (besides the layer's own)", NUMBER_DOUBLE,
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.SCALE, "Input scale: value*SCALE+OFFSET before the model's normalisation (e.g. 10000 for 0-1 "
            "reflectance)", NUMBER_DOUBLE, defaultValue=1.0, optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.OFFSET, "Input offset (see SCALE)", NUMBER_DOUBLE, defaultValue=0.0, optional=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.DEVICE, "Device (ONNX Runtime execution provider)", list(DEVICE_LABELS), defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            self.THREADS, "CPU threads (0 = ONNX Runtime's default: one per physical core)", NUMBER_INTEGER,
            defaultValue=0, minValue=0, maxValue=1024))

    def run_model(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
                  outputs: tuple[str, ...], need_classifier: bool = False,
                  consumer: Callable[[OnnxModel], TileConsumer] | None = None) -> Run:
        """Validate the parameters, build the working grid and run the model on every tile.

        ``consumer(model)`` makes a :class:`~..core.pipeline.TileConsumer` that takes the outputs as they come
        (they are then not stored per tile)."""
        try:
            return self._run_model(parameters, context, feedback, outputs, need_classifier, consumer)
        except PluginError as err:
            raise QgsProcessingException(str(err)) from err
        except Cancelled as err:
            raise QgsProcessingException("cancelled by the user; no output was written.") from err

    def _run_model(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
                   outputs: tuple[str, ...], need_classifier: bool,
                   consumer: Callable[[OnnxModel], TileConsumer] | None = None) -> Run:
        layer = self.raster_layer(parameters, self.INPUT, context)
        model = self.load_model(parameters, context, feedback, need_classifier)
        grid, mask_wkts = self.working_grid(layer, model, parameters, context, feedback)
        results = self.infer_layer(layer, model, grid, mask_wkts, parameters, context, feedback, outputs,
                                   consumer=consumer)
        return Run(results, grid, model)

    def raster_layer(self, parameters: dict, name: str, context: QgsProcessingContext) -> QgsRasterLayer:
        """The raster layer parameter ``name``, or a :class:`PluginError` when it is missing or unreadable."""
        layer: QgsRasterLayer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None or not layer.isValid():
            what = "input" if name == self.INPUT else name
            raise PluginError(f"the {what} raster layer is missing or invalid; choose a readable raster.")
        return layer

    def load_model(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
                   need_classifier: bool = False) -> OnnxModel:
        """The ``MODEL`` on the chosen ``DEVICE`` with ``THREADS`` intra-op threads."""
        model_path = self.parameterAsFile(parameters, self.MODEL, context)
        device = DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)]
        # the session of the previous run is reused when the file and options are the same
        model = OnnxModel.open(model_path, device=device,
                               threads=self.parameterAsInt(parameters, self.THREADS, context))
        if model.device_note:
            feedback.pushInfo(f"Device: {model.device_note}")
        if need_classifier and not model.info.is_classifier:
            raise PluginError(f"model {os.path.basename(model_path)} is an embedder (no classes); export it "
                              "with --head to classify, or use the embed algorithm.")
        self.check_model(model, model_path)
        return model

    def working_grid(self, layer: QgsRasterLayer, model: OnnxModel, parameters: dict, context: QgsProcessingContext,
                     feedback: QgsProcessingFeedback, other: QgsRasterLayer | None = None,
                     ) -> tuple[WorkingGrid, list[str] | None]:
        """The model-resolution grid over ``layer`` (cut by EXTENT, MASK and the extent of ``other``) and the
        mask polygons as WKT in its CRS."""
        crs, area, mask_wkts = self._area(layer, parameters, context, feedback, other)
        grid = make_grid(crs, area, model.info.gsd_m)
        if grid.width < 1 or grid.height < 1:
            raise PluginError(f"the area to process is empty at the model's {model.info.gsd_m:g} m resolution; "
                              "choose a larger extent.")
        return grid, mask_wkts

    def run_settings(self, parameters: dict, context: QgsProcessingContext) -> RunSettings:
        return RunSettings(
            overlap=self.parameterAsDouble(parameters, self.OVERLAP, context) / 100.0,
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            min_valid=self.parameterAsDouble(parameters, self.MIN_VALID, context),
            scale=self._number(parameters, self.SCALE, context, 1.0),
            offset=self._number(parameters, self.OFFSET, context, 0.0))

    def infer_layer(self, layer: QgsRasterLayer, model: OnnxModel, grid: WorkingGrid, mask_wkts: list[str] | None,
                    parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback,
                    outputs: tuple[str, ...], progress: tuple[float, float] = (0.0, 100.0),
                    consumer: Callable[[OnnxModel], TileConsumer] | None = None) -> TileResults:
        """Read ``layer`` on ``grid`` and run ``model`` on every tile, logging device, threads and speed;
        progress goes from ``progress[0]`` to ``progress[1]`` percent (``consumer``: see :meth:`run_model`)."""
        info = model.info
        bands = self._layer_bands(layer, info.bands, parameters, context, feedback)
        nodata = parameters.get(self.NODATA)
        reader = LayerReader(layer, bands, grid, nodata=None if nodata in (None, "") else
                             self.parameterAsDouble(parameters, self.NODATA, context), mask_wkts=mask_wkts)
        settings = self.run_settings(parameters, context)
        tiles = TileGrid.from_overlap(grid.width, grid.height, info.tile_size, settings.overlap)
        ep = model.execution_provider
        device = f"{device_name(ep)} ({ep}, {threads_text(model.threads)})"
        feedback.pushInfo(f"ONNX Runtime on {device}; {tiles.n_tiles} tiles of {info.tile_size} px at "
                          f"{info.gsd_m:g} m, stride {tiles.stride} px, grid {grid.width} x {grid.height} px.")
        if (settings.scale, settings.offset) != (1.0, 0.0):
            feedback.pushInfo(f"Input transform: value*{settings.scale:g}+{settings.offset:g} before the model's "
                              f"{info.scaler.scheme} normalisation.")
        low, high = progress
        results = infer(reader, model, settings, outputs=outputs,
                        progress=lambda p: feedback.setProgress(low + (high - low) * p / 100.0),
                        is_cancelled=feedback.isCanceled, source=reader.name,
                        consumer=consumer(model) if consumer is not None else None)
        for note in results.notes:
            feedback.pushInfo(note)
        feedback.pushInfo(results.summary(device))
        if feedback.isCanceled():
            raise Cancelled()
        return results

    def _number(self, parameters: dict, name: str, context: QgsProcessingContext, default: float) -> float:
        """An optional number parameter (``default`` when unset)."""
        if parameters.get(name) in (None, ""):
            return default
        return self.parameterAsDouble(parameters, name, context)

    def check_model(self, model: OnnxModel, path: str) -> None:
        """Refuse a model this algorithm cannot use (:class:`PluginError`); every bundle by default."""

    def _layer_bands(self, layer: QgsRasterLayer, model_bands: tuple[str, ...], parameters: dict,
                     context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> list[int]:
        """1-based layer bands feeding the model's bands (names, else position, user mapping first)."""
        provider = layer.dataProvider()
        labels = [layer_band_label(provider.generateBandName(i)) for i in range(1, layer.bandCount() + 1)]
        mapping_text = self.parameterAsString(parameters, self.BAND_MAPPING, context)
        override = parse_mapping(mapping_text, model_bands) if mapping_text.strip() else None
        bands = resolve_bands(model_bands, labels, override, source=f"layer '{layer.name()}'")
        feedback.pushInfo("Band mapping: " + ", ".join(f"{m}<-band {b}" for m, b in zip(model_bands, bands)))
        return bands

    def _area(self, layer: QgsRasterLayer, parameters: dict, context: QgsProcessingContext,
              feedback: QgsProcessingFeedback, other: QgsRasterLayer | None = None,
              ) -> tuple[QgsCoordinateReferenceSystem, QgsRectangle, list[str] | None]:
        """Working CRS, processing area in it (layer extent cut by the extent of ``other``, by EXTENT and the
        MASK's bbox), and the mask polygons as WKT in the working CRS."""
        area = QgsRectangle(layer.extent())
        if other is not None:
            try:
                to_layer = QgsCoordinateTransform(other.crs(), layer.crs(), context.transformContext())
                area = area.intersect(to_layer.transformBoundingBox(other.extent()))
            except QgsCsException:  # the other layer lies where the layer's CRS is undefined: no overlap
                area = QgsRectangle()
            if area.isEmpty():
                raise PluginError(f"'{layer.name()}' and '{other.name()}' do not overlap; choose two rasters of the "
                                  "same place.")
        if parameters.get(self.EXTENT):
            area = area.intersect(self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs()))
        mask_source = self.parameterAsSource(parameters, self.MASK, context)
        if mask_source is not None:
            to_layer = QgsCoordinateTransform(mask_source.sourceCrs(), layer.crs(), context.transformContext())
            area = area.intersect(to_layer.transformBoundingBox(mask_source.sourceExtent()))
        if area.isEmpty():
            raise PluginError("the extent/mask does not overlap the input raster; choose an area over it.")
        crs = working_crs(layer, area)
        if crs != layer.crs():
            feedback.pushInfo(f"Layer CRS {layer.crs().authid()} is geographic: working in {crs.authid()}.")
            area = QgsCoordinateTransform(layer.crs(), crs, context.transformContext()).transformBoundingBox(area)
        mask_wkts = geometries_as_wkt(mask_source, crs, context) if mask_source is not None else None
        return crs, area, mask_wkts

    def check_cancel(self, feedback: QgsProcessingFeedback) -> None:
        """Stop before writing the next output when the user cancelled."""
        if feedback.isCanceled():
            raise QgsProcessingException("cancelled by the user; outputs not yet written were not created.")

    def present_outputs(self, parameters: dict, context: QgsProcessingContext, outputs: list[OutputLayer],
                        source: str | None = None) -> None:
        """Name the outputs Processing loads ``"<input> — <product> (<model>)"``, style them and stack them
        in the order of ``outputs`` (first on top); ``source`` defaults to the ``INPUT`` layer's name."""
        if source is None:
            source = self.parameterAsRasterLayer(parameters, self.INPUT, context).name()
        present_outputs(context, outputs, source=source,
                        model_path=self.parameterAsFile(parameters, self.MODEL, context))

"""``explora_geo:classify``: patch classification into a tile grid, a class raster and a probability raster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterVectorDestination,
)

from ..core.products import attribute_columns, classify
from ..core.writers import FLOAT_NODATA, write_geotiff, write_tile_grid
from .base import TiledModelAlgorithm
from .loading import OutputLayer
from .styling import class_style, save_grid_style


class ClassifyAlgorithm(TiledModelAlgorithm):
    """Classify every tile of a raster with an exported explora-geo classifier."""

    OUTPUT_GRID = "OUTPUT_GRID"
    OUTPUT_CLASSES = "OUTPUT_CLASSES"
    OUTPUT_PROBABILITY = "OUTPUT_PROBABILITY"

    def name(self) -> str:
        return "classify"

    def displayName(self) -> str:
        return "Classify tiles (ExPLoRA)"

    def shortHelpString(self) -> str:
        return ("Runs an ONNX classifier exported by 'explora-geo export --head' over the raster, one tile per "
                "output cell. Writes a GeoPackage grid (class id, class name, probability, one probability per "
                "class, valid-pixel fraction, status ok/partial/nodata), a class raster with the class colours "
                "and a probability raster. Tiles with too few valid pixels are skipped (status 'nodata'), never "
                "classified. Geographic layers are processed in their UTM zone.")

    def createInstance(self) -> ClassifyAlgorithm:
        return ClassifyAlgorithm()

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT_GRID, "Tile grid (GeoPackage)"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_CLASSES, "Class raster"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_PROBABILITY, "Probability raster"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        grid_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_GRID, context)
        if not grid_path.lower().endswith(".gpkg"):
            grid_path = str(Path(grid_path).with_suffix(".gpkg"))
        class_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_CLASSES, context)
        prob_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_PROBABILITY, context)
        run = self.run_model(parameters, context, feedback, ("probabilities",), need_classifier=True)
        info = run.model.info
        result = classify(run.results.outputs["probabilities"], run.results.ran, run.results.valid_fraction)
        self.check_cancel(feedback)
        gt, wkt = run.cell_geotransform, run.crs_wkt
        write_tile_grid(grid_path, gt, wkt, attribute_columns(result, info.class_names,
                                                              run.results.valid_fraction))
        write_geotiff(class_path, result.class_id[None], gt, wkt, nodata=result.nodata_id,
                      descriptions=["class"], class_names=info.class_names, class_colors=info.class_colors)
        write_geotiff(prob_path, result.probability[None].astype(np.float32), gt, wkt, nodata=FLOAT_NODATA,
                      descriptions=["probability"])
        save_grid_style(grid_path, info.class_names, info.class_colors, feedback)
        style = class_style(info.class_names, info.class_colors)
        # the class map on top, the grey probability raster at the bottom
        self.present_outputs(parameters, context, [OutputLayer(class_path, "classes", style),
                                                   OutputLayer(grid_path, "tile grid", style),
                                                   OutputLayer(prob_path, "probability")])
        counts = np.bincount(result.class_id[run.results.ran].astype(np.int64), minlength=len(info.class_names))
        feedback.pushInfo("Tiles per class: " + ", ".join(f"{n}={c}" for n, c in zip(info.class_names, counts)))
        return {self.OUTPUT_GRID: grid_path, self.OUTPUT_CLASSES: class_path, self.OUTPUT_PROBABILITY: prob_path,
                **run.stats()}

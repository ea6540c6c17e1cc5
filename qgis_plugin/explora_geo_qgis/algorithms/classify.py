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

from ..core.model import ModelInfo
from ..core.outputs import write_classification
from .base import Run, TiledModelAlgorithm
from .loading import OutputLayer
from .styling import class_style, save_grid_style


class ClassifyAlgorithm(TiledModelAlgorithm):
    """Classify every tile of a raster with an exported explora-geo classifier."""

    OUTPUT_GRID = "OUTPUT_GRID"
    OUTPUT_CLASSES = "OUTPUT_CLASSES"
    OUTPUT_PROBABILITY = "OUTPUT_PROBABILITY"

    NAME = "classify"
    DISPLAY_NAME = "Classify tiles (ExPLoRA)"
    HELP = ("Runs an ONNX classifier exported by 'explora-geo export --head' over the raster, one tile per "
            "output cell. Writes a GeoPackage grid (class id, class name, probability, one probability per "
            "class, valid-pixel fraction, status ok/partial/nodata), a class raster with the class colours "
            "and a probability raster. Tiles with too few valid pixels (MIN_VALID) are skipped (status "
            "'nodata', nodata in every output), never classified; tiles with some nodata/NaN pixels are "
            "classified with those pixels filled (status 'partial'). The layer's values are checked against "
            "the model's scale (SCALE/OFFSET convert e.g. 0-1 reflectance). Geographic layers are processed "
            "in their UTM zone.")

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
        self.check_cancel(feedback)
        return write_classifier_outputs(self, run, run.model.info, parameters, context, feedback,
                                        grid_path=grid_path, class_path=class_path, prob_path=prob_path)


def write_classifier_outputs(alg: TiledModelAlgorithm, run: Run, info: ModelInfo, parameters: dict,
                             context: QgsProcessingContext, feedback: QgsProcessingFeedback, *, grid_path: str,
                             class_path: str, prob_path: str) -> dict:
    """Write what ``classify`` writes from ``run.results.outputs["probabilities"]`` with ``info``'s classes
    (``core.outputs.write_classification``: the tile grid, the class and probability rasters), store the grid's
    style, name, style and stack the layers Processing loads, log the tiles per class; returns the algorithm's
    result dict. Shared with classify_from_examples."""
    result = write_classification(run.results, info, grid_path=grid_path, class_path=class_path,
                                  prob_path=prob_path)
    save_grid_style(grid_path, info.class_names, info.class_colors, feedback)
    style = class_style(info.class_names, info.class_colors)
    # the class map on top, the grey probability raster at the bottom
    alg.present_outputs(parameters, context, [OutputLayer(class_path, "classes", style),
                                              OutputLayer(grid_path, "tile grid", style),
                                              OutputLayer(prob_path, "probability")])
    counts = np.bincount(result.class_id[run.results.ran].astype(np.int64), minlength=len(info.class_names))
    feedback.pushInfo("Tiles per class: " + ", ".join(f"{n}={c}" for n, c in zip(info.class_names, counts)))
    return {ClassifyAlgorithm.OUTPUT_GRID: grid_path, ClassifyAlgorithm.OUTPUT_CLASSES: class_path,
            ClassifyAlgorithm.OUTPUT_PROBABILITY: prob_path, **run.stats()}

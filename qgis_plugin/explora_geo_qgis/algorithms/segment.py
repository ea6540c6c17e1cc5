"""``explora_geo:segment``: a per-pixel class map from a segmenter bundle, windows blended without seams."""

from __future__ import annotations

import os

import numpy as np
from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingParameterRasterDestination,
)

from ..core.blending import SegmentationConsumer
from ..core.errors import PluginError
from ..core.model import OnnxModel
from ..core.outputs import write_segmentation
from .base import TiledModelAlgorithm
from .loading import OutputLayer
from .styling import class_style

DEFAULT_OVERLAP = 50.0


class SegmentAlgorithm(TiledModelAlgorithm):
    """Run an exported segmenter in overlapping windows and blend their logits into a class raster."""

    OUTPUT_CLASSES = "OUTPUT_CLASSES"
    OUTPUT_PROBABILITY = "OUTPUT_PROBABILITY"

    NAME = "segment"
    DISPLAY_NAME = "Segment pixels (ExPLoRA)"
    HELP = ("Runs a segmenter exported by 'explora-geo export' (from an ExploraSegmentationTask checkpoint) "
            "over the raster in overlapping windows (OVERLAP, default 50 %). The per-pixel logits of every "
            "window covering a pixel are averaged with a smooth window weight (highest in the window's "
            "centre), so there are no seams at window borders; the class is the arg-max of their softmax. "
            "Writes a class raster at the model's resolution with the class names and colours, and "
            "optionally the top-class probability. Pixels that are nodata, or lie only in windows below "
            "MIN_VALID, are nodata (255).")

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.parameterDefinition(self.OVERLAP).setDefaultValue(DEFAULT_OVERLAP)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_CLASSES, "Class raster"))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.OUTPUT_PROBABILITY, "Probability raster (top class)", optional=True, createByDefault=False))

    def check_model(self, model: OnnxModel, path: str) -> None:
        if model.info.model_type != "segmenter" or "logits" not in model.output_names:
            raise PluginError(f"model {os.path.basename(path)} is a {model.info.model_type}, not a segmenter (no "
                              "per-pixel 'logits' output); export a segmentation checkpoint with 'explora-geo "
                              "export --segmenter', or use the classify algorithm for a classifier.")

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        class_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_CLASSES, context)
        prob_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_PROBABILITY, context) \
            if parameters.get(self.OUTPUT_PROBABILITY) else None
        consumer = None

        def make_consumer(model: OnnxModel) -> SegmentationConsumer:
            nonlocal consumer
            consumer = SegmentationConsumer(len(model.info.class_names))
            return consumer

        run = self.run_model(parameters, context, feedback, ("logits",), consumer=make_consumer)
        info, blender = run.model.info, consumer.blender
        self.check_cancel(feedback)
        gt, wkt = run.grid.geotransform, run.crs_wkt
        write_segmentation(blender, info, gt, wkt, class_path=class_path, prob_path=prob_path)
        layers = [OutputLayer(class_path, "segments", class_style(info.class_names, info.class_colors))]
        if prob_path:
            layers.append(OutputLayer(prob_path, "segment probability"))
        self.present_outputs(parameters, context, layers)  # the class map on top
        labelled = blender.class_id != blender.nodata_id
        counts = np.bincount(blender.class_id[labelled].astype(np.int64), minlength=len(info.class_names))
        feedback.pushInfo(f"Class raster {blender.class_id.shape[1]} x {blender.class_id.shape[0]} px at "
                          f"{info.gsd_m:g} m; pixels per class: "
                          + ", ".join(f"{n}={c}" for n, c in zip(info.class_names, counts))
                          + f"; {int((~labelled).sum())} nodata.")
        result = {self.OUTPUT_CLASSES: class_path, "PIXELS_CLASSIFIED": int(labelled.sum()), **run.stats()}
        if prob_path:
            result[self.OUTPUT_PROBABILITY] = prob_path
        return result

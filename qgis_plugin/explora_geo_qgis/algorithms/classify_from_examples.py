"""``explora_geo:classify_from_examples``: the analyst's own classes from a few points or polygons.

The tiles are embedded with any bundle (its ``embedding`` output), the tiles under the examples train a
softmax head in numpy (``core/linear_head.py``), whose cross-validated accuracy is logged, and the head then
classifies every tile: the same outputs as ``classify``, with the classes named after the field's values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from qgis.core import (
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProcessingFeedback,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterVectorDestination,
    QgsRectangle,
)

from ..core.errors import PluginError
from ..core.linear_head import class_index, cross_validate, fit_linear_head
from ..core.model import default_colors
from ..core.onnx_metadata import head_bundle_metadata, write_head_bundle
from .base import Run, TiledModelAlgorithm
from .classify import write_classifier_outputs
from .compat import SOURCE_POINT, SOURCE_POLYGON
from .raster_source import memory_layer, rasterize


@dataclasses.dataclass
class Examples:
    """The usable examples: geometries (WKT, in the layer's CRS) and class index of each, and the class names."""

    wkts: list[str]
    labels: np.ndarray
    class_names: list[str]
    outside: int
    no_class: int


def read_examples(source: QgsProcessingFeatureSource, field: str, layer_crs: object, layer_extent: QgsRectangle,
                  context: QgsProcessingContext, name: str) -> Examples:
    """The examples over the raster with a class value; one-line errors for none over it and for one class."""
    transform = QgsCoordinateTransform(source.sourceCrs(), layer_crs, context.transformContext())
    request = QgsFeatureRequest().setSubsetOfAttributes([field], source.fields())
    wkts, values, outside, no_class = [], [], 0, 0
    for feature in source.getFeatures(request):
        geometry = feature.geometry()
        value = feature[field]
        if geometry is None or geometry.isEmpty():
            continue
        if value is None or (hasattr(value, "isNull") and value.isNull()) or str(value).strip() == "":
            no_class += 1
            continue
        geometry.transform(transform)
        if not geometry.boundingBox().intersects(layer_extent) or not geometry.intersects(
                _extent_geometry(layer_extent)):
            outside += 1
            continue
        wkts.append(geometry.asWkt())
        values.append(value)
    if not wkts:
        raise PluginError(
            f"none of the {outside + no_class} example(s) of '{name}' lies over the input raster with a value in "
            f"'{field}' ({outside} outside the raster, {no_class} without a class); draw examples over the raster "
            "and fill in their class.")
    names, labels = class_index(values)
    if len(names) < 2:
        raise PluginError(f"the class field '{field}' of '{name}' holds a single class ({names[0]!r}) on the "
                          f"{len(wkts)} example(s) over the raster; add examples of at least one other class.")
    return Examples(wkts, labels, names, outside, no_class)


def _extent_geometry(extent: QgsRectangle) -> object:
    from qgis.core import QgsGeometry

    return QgsGeometry.fromRect(extent)


def cells_of_example(wkt: str, crs: object, geotransform: tuple[float, ...], n_rows: int, n_cols: int,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Output cells under one example: cells whose centre lies in the polygon (the cell holding the point);
    for a polygon smaller than every cell, the cell holding its point on surface. Returns ``(rows, cols)``."""
    from qgis.core import QgsGeometry

    geometry = QgsGeometry.fromWkt(wkt)
    x0, dx, _, y0, _, dy = geotransform
    box = geometry.boundingBox()
    c0 = max(math.floor((box.xMinimum() - x0) / dx), 0)
    c1 = min(math.floor((box.xMaximum() - x0) / dx) + 1, n_cols)
    r0 = max(math.floor((box.yMaximum() - y0) / dy), 0)
    r1 = min(math.floor((box.yMinimum() - y0) / dy) + 1, n_rows)
    if c1 <= c0 or r1 <= r0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    window = (x0 + c0 * dx, dx, 0.0, y0 + r0 * dy, 0.0, dy)
    is_point = geometry.type() == 0  # QgsWkbTypes.PointGeometry
    hit = rasterize(memory_layer([wkt], crs), window, c1 - c0, r1 - r0, all_touched=is_point)
    if not hit.any() and not is_point:
        point = geometry.pointOnSurface().asWkt()
        hit = rasterize(memory_layer([point], crs), window, c1 - c0, r1 - r0, all_touched=True)
    rows, cols = np.nonzero(hit)
    return rows + r0, cols + c0


class ClassifyFromExamplesAlgorithm(TiledModelAlgorithm):
    """Few-shot classification: a numpy softmax head fitted on the embeddings of the tiles under examples."""

    EXAMPLES = "EXAMPLES"
    CLASS_FIELD = "CLASS_FIELD"
    OUTPUT_GRID = "OUTPUT_GRID"
    OUTPUT_CLASSES = "OUTPUT_CLASSES"
    OUTPUT_PROBABILITY = "OUTPUT_PROBABILITY"
    OUTPUT_MODEL = "OUTPUT_MODEL"

    NAME = "classify_from_examples"
    DISPLAY_NAME = "Classify from examples (ExPLoRA few-shot)"
    HELP = ("Your own classes from a few examples. Embeds every tile with any model exported by 'explora-geo "
            "export' (its embedding), takes the tiles under the example points/polygons (a polygon: the tiles "
            "whose cell centre it covers), labels them with CLASS_FIELD, fits a linear softmax classifier "
            "(numpy, class-balanced, L2) and logs its accuracy cross-validated over whole examples. Then "
            "classifies every tile: the same tile grid, class raster and probability raster as 'classify', "
            "the classes named after the field's values. OUTPUT_MODEL saves the model with the fitted head "
            "as a classifier that 'classify' runs on other rasters.")

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.EXAMPLES, "Examples (points or polygons)", [SOURCE_POINT, SOURCE_POLYGON]))
        self.addParameter(QgsProcessingParameterField(
            self.CLASS_FIELD, "Class field of the examples", parentLayerParameterName=self.EXAMPLES))
        self.addParameter(QgsProcessingParameterVectorDestination(self.OUTPUT_GRID, "Tile grid (GeoPackage)"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_CLASSES, "Class raster"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_PROBABILITY, "Probability raster"))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_MODEL, "Model with the fitted classes (.onnx, for 'classify')", "ONNX models (*.onnx)",
            optional=True, createByDefault=False))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        try:
            return self._process(parameters, context, feedback)
        except PluginError as err:
            raise QgsProcessingException(str(err)) from err

    def _process(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        source = self.parameterAsSource(parameters, self.EXAMPLES, context)
        field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
        if layer is None or not layer.isValid():
            raise PluginError("the input raster layer is missing or invalid; choose a readable raster.")
        if source is None:
            raise PluginError("the examples layer is missing; choose a point or polygon layer.")
        if source.fields().lookupField(field) < 0:
            raise PluginError(f"the examples have no field '{field}'; choose one of "
                              f"{', '.join(source.fields().names())}.")
        vector = self.parameterAsVectorLayer(parameters, self.EXAMPLES, context)
        examples = read_examples(source, field, layer.crs(), layer.extent(), context,
                                 vector.name() if vector is not None else "the examples")
        if examples.outside or examples.no_class:
            feedback.pushInfo(f"Examples: {examples.outside} outside the raster and {examples.no_class} without a "
                              f"value in '{field}' are not used.")
        model_out = self.parameterAsFileOutput(parameters, self.OUTPUT_MODEL, context) \
            if parameters.get(self.OUTPUT_MODEL) else ""
        if model_out and not model_out.lower().endswith(".onnx"):
            raise PluginError(f"the model output {model_out} must end in .onnx; choose e.g. "
                              f"{Path(model_out).with_suffix('.onnx').name}.")
        grid_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_GRID, context)
        if not grid_path.lower().endswith(".gpkg"):
            grid_path = str(Path(grid_path).with_suffix(".gpkg"))
        class_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_CLASSES, context)
        prob_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_PROBABILITY, context)

        run = self.run_model(parameters, context, feedback, ("embedding",))
        features, labels, groups = self._training_tiles(run, examples, layer.crs(), context, feedback)
        names, k = examples.class_names, len(examples.class_names)
        cv = cross_validate(features, labels, groups, k)
        if cv is None:
            feedback.pushInfo("Cross-validation skipped: some class has a single example (nothing to hold out); "
                              "add examples to measure the accuracy.")
        else:
            feedback.pushInfo(
                f"Cross-validated accuracy on the examples: {cv.accuracy:.3f} (balanced {cv.balanced_accuracy:.3f}; "
                f"{cv.folds} folds, whole examples held out, {cv.n_tiles} tiles); per class: "
                + ", ".join(f"{n}={r:.2f}" for n, r in zip(names, cv.per_class)))
        head = fit_linear_head(features, labels, k)
        self.check_cancel(feedback)
        colors = list(default_colors(k))
        results = run.results
        embedding = results.outputs["embedding"]
        probabilities = np.full((*results.ran.shape, k), np.nan, np.float32)
        probabilities[results.ran] = head.probabilities(embedding[results.ran])
        results.outputs["probabilities"] = probabilities
        info = dataclasses.replace(run.model.info, model_type="classifier", class_names=tuple(names),
                                   class_colors=tuple(colors))
        out = write_classifier_outputs(self, run, info, parameters, context, feedback, grid_path=grid_path,
                                       class_path=class_path, prob_path=prob_path)
        if model_out:
            model_path = self.parameterAsFile(parameters, self.MODEL, context)
            provenance = {"source": "classify_from_examples", "model": os.path.basename(model_path),
                          "class_field": field, "training_tiles": int(labels.size),
                          "cv_accuracy": cv.accuracy if cv is not None else None}
            meta = head_bundle_metadata(dict(run.model.info.raw), head, names, colors, provenance)
            onnx_path, json_path = write_head_bundle(model_path, model_out, meta)
            feedback.pushInfo(f"Saved the model with the fitted classes to {onnx_path} (+ {json_path.name}); "
                              "'classify' runs it.")
            out[self.OUTPUT_MODEL] = model_out
        out["CV_ACCURACY"] = cv.accuracy if cv is not None else None
        out["TRAINING_TILES"] = int(labels.size)
        return out

    def _training_tiles(self, run: Run, examples: Examples, layer_crs: object, context: QgsProcessingContext,
                        feedback: QgsProcessingFeedback) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embeddings ``[N, D]``, class ``[N]`` and example id ``[N]`` of the processed tiles under the examples;
        a tile under examples of two classes is left out."""
        crs = run.grid.crs
        to_working = QgsCoordinateTransform(layer_crs, crs, context.transformContext())
        gt, n_rows, n_cols = run.cell_geotransform, run.tiles.n_rows, run.tiles.n_cols
        owner = np.full((n_rows, n_cols), -1, np.int64)  # example id, -2 = claimed by two classes
        cell_class = np.full((n_rows, n_cols), -1, np.int64)
        from qgis.core import QgsGeometry

        for i, (wkt, label) in enumerate(zip(examples.wkts, examples.labels)):
            geometry = QgsGeometry.fromWkt(wkt)
            geometry.transform(to_working)
            rows, cols = cells_of_example(geometry.asWkt(), crs, gt, n_rows, n_cols)
            clash = (cell_class[rows, cols] >= 0) & (cell_class[rows, cols] != label)
            owner[rows[clash], cols[clash]] = -2
            free = owner[rows, cols] == -1
            owner[rows[free], cols[free]] = i
            cell_class[rows[free], cols[free]] = label
        conflicts = int((owner == -2).sum())
        use = (owner >= 0) & run.results.ran
        on_nodata = int(((owner >= 0) & ~run.results.ran).sum())
        labels = cell_class[use]
        counts = np.bincount(labels, minlength=len(examples.class_names))
        feedback.pushInfo("Training tiles per class: " + ", ".join(
            f"{n}={c} (from {len(np.unique(owner[use][labels == k]))} example(s))"
            for k, (n, c) in enumerate(zip(examples.class_names, counts)))
            + f"; {conflicts} tile(s) under examples of two classes and {on_nodata} on skipped tiles left out.")
        missing = [n for n, c in zip(examples.class_names, counts) if c == 0]
        if missing:
            raise PluginError(f"class(es) {', '.join(repr(m) for m in missing)} have no example on a processed "
                              "tile (their examples fall outside the processed area, on nodata, or on tiles "
                              "claimed by another class); add examples of them over valid pixels.")
        return run.results.outputs["embedding"][use].astype(np.float64), labels, owner[use]

"""Class colours for the classify outputs: a categorized style stored in the GeoPackage (its default style)
and applied to the layers Processing loads, and a paletted renderer for the class raster."""

from __future__ import annotations

from collections.abc import Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor


def grid_renderer(class_names: Sequence[str], class_colors: Sequence[str]) -> QgsCategorizedSymbolRenderer:
    """Categories on ``class_id`` with the class colours; skipped tiles (-1) hollow grey."""
    categories = []
    for k, (name, color) in enumerate(zip(class_names, class_colors)):
        symbol = QgsFillSymbol.createSimple({"color": color, "outline_style": "no"})
        categories.append(QgsRendererCategory(k, symbol, name))
    empty = QgsFillSymbol.createSimple({"style": "no", "outline_color": "#808080"})
    categories.append(QgsRendererCategory(-1, empty, "nodata (skipped)"))
    return QgsCategorizedSymbolRenderer("class_id", categories)


def raster_renderer(layer: QgsRasterLayer, class_names: Sequence[str],
                    class_colors: Sequence[str]) -> QgsPalettedRasterRenderer:
    classes = [QgsPalettedRasterRenderer.Class(k, QColor(c), n)
               for k, (n, c) in enumerate(zip(class_names, class_colors))]
    return QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)


def save_grid_style(path: str, class_names: Sequence[str], class_colors: Sequence[str],
                    feedback: QgsProcessingFeedback) -> None:
    """Store the categorized style in the GeoPackage as its default, so every later load shows it."""
    layer = QgsVectorLayer(path, "tiles", "ogr")
    if not layer.isValid():
        feedback.reportError(f"could not reopen {path} to store its style")
        return
    layer.setRenderer(grid_renderer(class_names, class_colors))
    error = layer.saveStyleToDatabase("explora_geo_classes", "class colours", True, "")
    if error:
        feedback.pushInfo(f"Style not stored in the GeoPackage: {error}")


class ClassStylePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Applies the class colours to a loaded output layer (``kind`` = ``"grid"`` or ``"raster"``).

    Create it with :meth:`create`: Processing keeps only a C++ pointer to a post-processor and runs it after
    the algorithm object is gone, so the Python object must be kept alive elsewhere (the usual QGIS plugin
    pattern); the class keeps the most recent few.
    """

    _alive: list[ClassStylePostProcessor] = []
    _KEEP = 32

    def __init__(self, kind: str, class_names: Sequence[str], class_colors: Sequence[str]) -> None:
        super().__init__()
        self.kind = kind
        self.class_names = list(class_names)
        self.class_colors = list(class_colors)

    @classmethod
    def create(cls, kind: str, class_names: Sequence[str], class_colors: Sequence[str]) -> ClassStylePostProcessor:
        processor = cls(kind, class_names, class_colors)
        cls._alive = [*cls._alive[-(cls._KEEP - 1):], processor]
        return processor

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> None:
        if self.kind == "grid" and isinstance(layer, QgsVectorLayer):
            layer.setRenderer(grid_renderer(self.class_names, self.class_colors))
        elif self.kind == "raster" and isinstance(layer, QgsRasterLayer):
            layer.setRenderer(raster_renderer(layer, self.class_names, self.class_colors))
        layer.triggerRepaint()

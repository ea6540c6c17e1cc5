"""Class colours for class outputs: a categorized style stored in the GeoPackage (its default style) and
applied to the layers Processing loads, and a paletted renderer for class rasters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProcessingFeedback,
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


def class_style(class_names: Sequence[str], class_colors: Sequence[str]) -> Callable[[QgsMapLayer], None]:
    """A style callback (see ``loading.OutputLayer``) giving a class raster its paletted renderer and a tile
    grid its categorized renderer, in the class colours."""
    names, colors = list(class_names), list(class_colors)

    def apply(layer: QgsMapLayer) -> None:
        if isinstance(layer, QgsVectorLayer):
            layer.setRenderer(grid_renderer(names, colors))
        elif isinstance(layer, QgsRasterLayer):
            layer.setRenderer(raster_renderer(layer, names, colors))

    return apply

"""Styles of loaded outputs: class colours (a categorized style stored in the GeoPackage as its default and
applied to the layers Processing loads, a paletted renderer for class rasters) and a colour ramp for scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProcessingFeedback,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsStyle,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from .compat import RAMP_INTERPOLATED, STATS_MIN_MAX


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


def ramp_style(ramp: str = "Reds") -> Callable[[QgsMapLayer], None]:
    """A style callback colouring band 1 of a score raster with the QGIS colour ramp ``ramp`` stretched over
    its valid values (low = light, high = dark for ``Reds``)."""

    def apply(layer: QgsMapLayer) -> None:
        if not isinstance(layer, QgsRasterLayer):
            return
        stats = layer.dataProvider().bandStatistics(1, STATS_MIN_MAX)
        color_ramp = QgsStyle.defaultStyle().colorRamp(ramp)
        if color_ramp is None or not stats.maximumValue > stats.minimumValue:
            return  # no such ramp, or a constant / all-nodata raster: QGIS's default grey is as good
        function = QgsColorRampShader(stats.minimumValue, stats.maximumValue, color_ramp, RAMP_INTERPOLATED)
        function.classifyColorRamp(5, 1)
        shader = QgsRasterShader()
        shader.setRasterShaderFunction(function)
        layer.setRenderer(QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader))

    return apply

"""explora-geo QGIS plugin: ExPLoRA models (exported to ONNX) in the Processing toolbox.

Depends only on numpy and onnxruntime (plus the GDAL bindings QGIS ships). ``core/`` holds the inference
code and imports no ``qgis``.
"""

from __future__ import annotations

from typing import Any


def classFactory(iface: Any) -> Any:  # noqa: N802 (QGIS's required name)
    """QGIS entry point: the plugin object."""
    from .plugin import ExploraGeoPlugin

    return ExploraGeoPlugin(iface)

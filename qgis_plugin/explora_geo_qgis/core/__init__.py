"""Inference core of the explora-geo QGIS plugin.

Nothing in this package imports ``qgis``: it needs numpy and onnxruntime, and (for the writers) GDAL's
``osgeo`` bindings, which every QGIS installation ships. The QGIS algorithms in ``..algorithms`` only adapt
QGIS layers and parameters to these functions, so the tiling, scaling, batching, stitching and writing are
tested on their own.
"""

from __future__ import annotations

from .errors import PluginError

__all__ = ["PluginError"]

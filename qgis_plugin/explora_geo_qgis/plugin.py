"""The QGIS plugin object: registers the Processing provider."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsApplication

from .provider import ExploraGeoProvider


class ExploraGeoPlugin:
    """Adds the ``explora_geo`` provider to the Processing toolbox (and removes it on unload)."""

    def __init__(self, iface: Any = None) -> None:
        self.iface = iface
        self.provider: ExploraGeoProvider | None = None  # keep a reference, or the algorithms vanish

    def initProcessing(self) -> None:
        self.provider = ExploraGeoProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()

    def unload(self) -> None:
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

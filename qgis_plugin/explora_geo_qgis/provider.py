"""The ``explora_geo`` Processing provider."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms.change import ChangeAlgorithm
from .algorithms.classify import ClassifyAlgorithm
from .algorithms.classify_from_examples import ClassifyFromExamplesAlgorithm
from .algorithms.cluster import ClusterAlgorithm
from .algorithms.embed import EmbedAlgorithm
from .algorithms.segment import SegmentAlgorithm
from .algorithms.similarity import SimilarityAlgorithm


class ExploraGeoProvider(QgsProcessingProvider):
    """Provides ``explora_geo:classify``, ``classify_from_examples``, ``embed``, ``similarity``, ``segment``,
    ``cluster`` and ``change``."""

    def id(self) -> str:
        return "explora_geo"

    def name(self) -> str:
        return "ExPLoRA geo"

    def longName(self) -> str:
        return "ExPLoRA geo: adapted vision transformers for Earth observation (ONNX Runtime)"

    def icon(self) -> QIcon:
        return QIcon(str(Path(__file__).with_name("icon.png")))

    def loadAlgorithms(self) -> None:
        for algorithm in (ClassifyAlgorithm(), ClassifyFromExamplesAlgorithm(), EmbedAlgorithm(), SegmentAlgorithm(),
                          SimilarityAlgorithm(), ClusterAlgorithm(), ChangeAlgorithm()):
            self.addAlgorithm(algorithm)

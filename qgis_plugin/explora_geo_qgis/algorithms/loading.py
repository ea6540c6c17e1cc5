"""How a run's outputs arrive in the QGIS project: named after the input and the product, styled, stacked.

Processing loads an algorithm's output layers after the run (when the user left "Open output file after
running" ticked, or called ``processing.runAndLoadResults``). By default QGIS names them after the output's
description ("Class raster") and, on QGIS 3.22, adds them in the order of their file paths, so a grey
probability raster can hide the class map and a second run cannot be told from the first. Here every output
layer of a run is:

- named ``"<input> — <product> (<model>)"``, e.g. ``"T33UUU — classes (eurosat_classifier)"``;
- styled by an optional callback (class colours, ramps);
- stacked in the order the algorithm lists its outputs, first on top (``layerSortKey`` where QGIS has it,
  3.32+; on older QGIS the layer tree is reordered as each layer of the run arrives).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from qgis.core import (
    QgsLayerTreeGroup,
    QgsLayerTreeLayer,
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProject,
)

#: Styles a freshly loaded output layer (e.g. sets a paletted renderer).
Style = Callable[[QgsMapLayer], None]

SEPARATOR = " — "


@dataclass(frozen=True)
class OutputLayer:
    """One output of a run as it should appear in the project.

    Attributes:
        path: the output's path, as returned by ``parameterAsOutputLayer``.
        product: what the layer holds, e.g. ``"classes"``, ``"probability"``, ``"change"``.
        style: applied to the loaded layer, or ``None`` for QGIS's default style.
    """

    path: str
    product: str
    style: Style | None = None


def layer_name(source: str, product: str, model_path: str) -> str:
    """``"<source> — <product> (<model file stem>)"``, e.g. ``"T33UUU — classes (eurosat_classifier)"``."""
    return f"{source}{SEPARATOR}{product} ({Path(model_path).stem})"


def present_outputs(context: QgsProcessingContext, outputs: Sequence[OutputLayer], *, source: str,
                    model_path: str) -> list[str]:
    """Name, style and order the outputs that Processing will load when the run ends.

    Args:
        context: the run's processing context.
        outputs: the run's outputs, the one to show on top first.
        source: the input's name (a layer name, or e.g. ``"before → after"``).
        model_path: the ``.onnx`` file; its stem names the model.

    Returns:
        The layer names given, one per output that will be loaded (others are left alone).
    """
    run = uuid.uuid4().hex
    names = []
    for rank, output in enumerate(outputs):
        if not context.willLoadLayerOnCompletion(output.path):
            continue
        name = layer_name(source, output.product, model_path)
        details = context.layerToLoadOnCompletionDetails(output.path)
        details.name = name
        details.forceName = True  # also when the user typed a file name: it says neither input nor model
        if hasattr(details, "layerSortKey"):  # QGIS >= 3.32: greater keys are placed above lesser ones
            details.layerSortKey = len(outputs) - rank
        details.setPostProcessor(OutputPostProcessor.create(run, rank, name, output.style))
        names.append(name)
    return names


class OutputPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Names, styles and places one loaded output layer of a run.

    Create it with :meth:`create`: Processing keeps only a C++ pointer to a post-processor and runs it after
    the algorithm object is gone, so the Python object must be kept alive elsewhere (the usual QGIS plugin
    pattern); the class keeps the most recent ones.
    """

    _alive: ClassVar[list[OutputPostProcessor]] = []
    _KEEP = 64
    #: run id -> [(rank, layer id)] of the layers of that run loaded so far
    _loaded: ClassVar[dict[str, list[tuple[int, str]]]] = {}

    def __init__(self, run: str, rank: int, name: str, style: Style | None) -> None:
        super().__init__()
        self.run = run
        self.rank = rank
        self.name = name
        self.style = style

    @classmethod
    def create(cls, run: str, rank: int, name: str, style: Style | None) -> OutputPostProcessor:
        processor = cls(run, rank, name, style)
        cls._alive = [*cls._alive[-(cls._KEEP - 1):], processor]
        live_runs = {p.run for p in cls._alive}
        cls._loaded = {r: v for r, v in cls._loaded.items() if r in live_runs}
        return processor

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,  # noqa: N802 (QGIS API)
                         feedback: QgsProcessingFeedback) -> None:
        layer.setName(self.name)
        if self.style is not None:
            self.style(layer)
        loaded = self._loaded.setdefault(self.run, [])
        loaded.append((self.rank, layer.id()))
        project = context.project() or QgsProject.instance()
        stack_in_rank_order(project.layerTreeRoot(), [layer_id for _, layer_id in sorted(loaded)])
        layer.triggerRepaint()


def stack_in_rank_order(root: QgsLayerTreeGroup, layer_ids: Sequence[str]) -> None:
    """Place the tree nodes of ``layer_ids`` next to each other in that order (first on top), where the
    topmost of them is now, inside its group. Layers not in the tree (yet) are left out."""
    nodes: list[QgsLayerTreeLayer] = [n for n in (root.findLayer(i) for i in layer_ids) if n is not None]
    if len(nodes) < 2:
        return
    parent = nodes[0].parent()  # a node elsewhere (the user moved it meanwhile) joins this group
    top = min(parent.children().index(n) for n in nodes if n.parent() is parent)
    for target, node in enumerate(nodes, start=top):
        if node.parent() is parent and parent.children().index(node) == target:
            continue
        # insert a clone first and only then remove the original: a layer whose last tree node is removed
        # is removed from the project
        parent.insertChildNode(target, node.clone())
        node.parent().removeChildNode(node)

"""Outputs as they arrive in the project (headless QGIS 3.22): named after the input, the product and the model,
styled, and stacked with the class map on top. The same checks in the real desktop: ``test_desktop.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

EXTENT = "330000,333200,5818840,5822040 [EPSG:32633]"


@pytest.fixture()
def project(qgis_app: Any) -> Any:
    from qgis.core import QgsProject

    project = QgsProject.instance()
    project.removeAllMapLayers()
    yield project
    project.removeAllMapLayers()


def _input(project: Any, path: Path, name: str) -> Any:
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    project.addMapLayer(layer, False)  # not in the layer tree: the tree then holds only the outputs
    return layer


def _run_and_load(project: Any, alg: str, params: dict) -> None:
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback

    context = QgsProcessingContext()
    context.setProject(project)
    processing.runAndLoadResults(f"explora_geo:{alg}", params, context=context, feedback=QgsProcessingFeedback())


def _tree(project: Any) -> list[str]:
    """Layer names in the layer tree, top to bottom."""
    return [node.name() for node in project.layerTreeRoot().findLayers()]


def test_classify_outputs_named_and_class_map_on_top(project: Any, bundle: dict, t33uuu_vrt: Path,
                                                     tmp_path: Path) -> None:
    layer = _input(project, t33uuu_vrt, "T33UUU")
    # file names sorted so QGIS 3.22 would load the classes first and the probability raster last, i.e. on top
    params = {"INPUT": layer, "MODEL": str(bundle["classifier"]), "EXTENT": EXTENT,
              "OUTPUT_CLASSES": str(tmp_path / "a_classes.tif"), "OUTPUT_GRID": str(tmp_path / "b_grid.gpkg"),
              "OUTPUT_PROBABILITY": str(tmp_path / "c_probability.tif")}
    _run_and_load(project, "classify", params)
    assert _tree(project) == ["T33UUU — classes (classifier)", "T33UUU — tile grid (classifier)",
                              "T33UUU — probability (classifier)"]
    nodes = project.layerTreeRoot().findLayers()
    assert nodes[0].layer().renderer().type() == "paletted"
    assert [c.label for c in nodes[0].layer().renderer().classes()] == ["water", "vegetation", "built-up"]
    assert nodes[1].layer().renderer().type() == "categorizedSymbol"
    assert nodes[2].layer().renderer().type() == "singlebandgray"

    # a second run, on another input and with temporary outputs, stacks its own three on top, told apart by name
    other = _input(project, t33uuu_vrt, "T33UUU 2023")
    _run_and_load(project, "classify", {**params, "INPUT": other, "OUTPUT_CLASSES": "TEMPORARY_OUTPUT",
                                        "OUTPUT_GRID": "TEMPORARY_OUTPUT", "OUTPUT_PROBABILITY": "TEMPORARY_OUTPUT"})
    assert _tree(project) == [f"{src} — {product} (classifier)" for src in ("T33UUU 2023", "T33UUU")
                              for product in ("classes", "tile grid", "probability")]


def test_embed_and_similarity_outputs_named(project: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsVectorLayer

    layer = _input(project, t33uuu_vrt, "scene")
    common = {"INPUT": layer, "MODEL": str(bundle["embedder"]), "EXTENT": EXTENT}
    _run_and_load(project, "embed", {**common, "OUTPUT": str(tmp_path / "emb.tif")})
    points = QgsVectorLayer("Point?crs=EPSG:32633", "ref", "memory")
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY

    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(331000, 5820000)))
    points.dataProvider().addFeatures([feature])
    project.addMapLayer(points, False)
    _run_and_load(project, "similarity", {**common, "REFERENCE": points, "OUTPUT": "TEMPORARY_OUTPUT"})
    assert _tree(project) == ["scene — similarity (embedder)", "scene — embeddings (embedder)"]


def test_stack_in_rank_order_moves_nodes_without_losing_layers(project: Any) -> None:
    from explora_geo_qgis.algorithms.loading import stack_in_rank_order
    from qgis.core import QgsVectorLayer

    layers = [QgsVectorLayer("Point?crs=EPSG:4326", name, "memory") for name in ("c", "user", "a", "b")]
    for lay in layers:
        project.addMapLayer(lay)  # each goes on top: tree is b, a, user, c
    assert _tree(project) == ["b", "a", "user", "c"]
    a, b, c = layers[2], layers[3], layers[0]
    stack_in_rank_order(project.layerTreeRoot(), [a.id(), b.id(), c.id()])
    assert _tree(project) == ["a", "b", "c", "user"]
    assert len(project.mapLayers()) == 4  # moved, not removed
    stack_in_rank_order(project.layerTreeRoot(), [c.id(), "not-in-the-tree", a.id()])
    assert _tree(project) == ["c", "a", "b", "user"]

"""Fixtures of the QGIS plugin suite (runs in ``.venv-qgis``: Debian python3 + QGIS 3.22, no torch).

- ``qgis_app``: one headless QGIS for the session, with Processing and the explora_geo provider registered;
  all layers are removed before ``exitQgis()`` (QGIS segfaults otherwise).
- ``bundle``: a tiny backbone + probe head built with the library's ``.venv`` and exported by the real
  ``explora-geo export`` CLI, as a classifier and as an embedder; ``segmenter_bundle``: a segmenter likewise.
- ``t33uuu_vrt``: the real T33UUU scene as a 13-band VRT stack at 10 m whose bands are described B01..B12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN_ROOT = REPO / "qgis_plugin"
LIB_PYTHON = REPO / ".venv" / "bin" / "python"
LIB_CLI = REPO / ".venv" / "bin" / "explora-geo"
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"

if str(PLUGIN_ROOT) not in sys.path:
    sys.path.insert(0, str(PLUGIN_ROOT))


@pytest.fixture(scope="session")
def qgis_app() -> Iterator[Any]:
    """A headless QGIS application with Processing and the explora_geo provider."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # The plugin suite runs in .venv-qgis, which scripts/setup.sh builds with QGIS: a missing QGIS is a broken
    # set-up, so it fails here instead of skipping every test.
    try:
        import qgis.core as qgis_core
    except ImportError as err:
        pytest.fail(f"QGIS Python bindings are not importable ({err}); run the plugin tests in .venv-qgis "
                    "(scripts/setup.sh builds it).")
    if QGIS_PLUGINS not in sys.path:
        sys.path.append(QGIS_PLUGINS)
    app = qgis_core.QgsApplication([], False)
    app.setPrefixPath("/usr", True)
    app.initQgis()
    from processing.core.Processing import Processing

    Processing.initialize()
    from explora_geo_qgis import classFactory

    plugin = classFactory(None)
    plugin.initProcessing()
    yield app
    qgis_core.QgsProject.instance().removeAllMapLayers()
    plugin.unload()
    import gc

    gc.collect()
    app.exitQgis()


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # noqa: S603 (our own tools)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``classifier`` and ``embedder`` ONNX files exported by ``explora-geo export`` during this run."""
    if not LIB_CLI.exists():
        pytest.fail(f"{LIB_CLI} is missing: run scripts/setup.sh to create the library environment")
    out = tmp_path_factory.mktemp("bundle")
    _run([str(LIB_PYTHON), str(Path(__file__).with_name("make_tiny_bundle.py")), str(out)])
    backbone, head = out / "backbone.safetensors", out / "head.safetensors"
    line = _run([str(LIB_CLI), "export", "--checkpoint", str(backbone), "--format", "onnx",
                 "--out", str(out / "classifier.onnx"), "--head", str(head)]).strip().splitlines()[-1]
    assert json.loads(line)["model_type"] == "classifier"
    _run([str(LIB_CLI), "export", "--checkpoint", str(backbone), "--out", str(out / "embedder.onnx")])
    return {"classifier": out / "classifier.onnx", "embedder": out / "embedder.onnx", "dir": out}


@pytest.fixture(scope="session")
def segmenter_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmenter ONNX bundle (2 classes: water, land) exported by ``explora-geo export --segmenter`` from a
    Lightning checkpoint of a tiny ExploraSegmentationTask trained during this run."""
    out = tmp_path_factory.mktemp("segmenter")
    _run([str(LIB_PYTHON), str(Path(__file__).with_name("make_tiny_bundle.py")), str(out), "--segmenter"])
    line = _run([str(LIB_CLI), "export", "--checkpoint", str(out / "segmenter.ckpt"), "--segmenter",
                 "--out", str(out / "segmenter.onnx")]).strip().splitlines()[-1]
    assert json.loads(line)["model_type"] == "segmenter"
    return out / "segmenter.onnx"


def build_vrt(band_files: list[str], path: Path, descriptions: list[str]) -> Path:
    """A band-stack VRT (highest resolution) whose bands carry ``descriptions``."""
    from osgeo import gdal

    vrt = gdal.BuildVRT(str(path), band_files, separate=True, resolution="highest")
    for i, desc in enumerate(descriptions, start=1):
        vrt.GetRasterBand(i).SetDescription(desc)
    vrt = None
    return path


@pytest.fixture(scope="session")
def t33uuu_files(t33uuu_dir: Path) -> dict[str, str]:
    """Band name -> JP2 path of the real T33UUU scene."""
    return {p.stem.rsplit("_", 1)[-1]: str(p) for p in sorted(t33uuu_dir.glob("*.jp2"))}


@pytest.fixture(scope="session")
def t33uuu_vrt(t33uuu_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 13 bands of T33UUU (file order B01..B12, B8A last), 1536 x 768 px at 10 m, EPSG:32633."""
    names = list(t33uuu_files)
    return build_vrt([t33uuu_files[n] for n in names], tmp_path_factory.mktemp("vrt") / "t33uuu.vrt", names)


@pytest.fixture(scope="session")
def vrt_builder() -> Any:
    """:func:`build_vrt`, for tests that stack other band selections."""
    return build_vrt

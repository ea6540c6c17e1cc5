"""``explora-geo predict`` (the library's CLI, run in ``.venv``) writes the same files as the plugin's
``classify`` / ``embed`` (run here in headless QGIS) on the same raster and bundle: one engine, two front ends."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from osgeo import gdal, ogr

REPO = Path(__file__).resolve().parents[2]
PLUGIN_ROOT = REPO / "qgis_plugin"
LIB_PYTHON = REPO / ".venv" / "bin" / "python"


def _predict(bundle: Path, data: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{PLUGIN_ROOT}"}
    cmd = [str(LIB_PYTHON), "-m", "explora_geo", "predict", "--bundle", str(bundle), "--data", str(data), "--out",
           str(out), "--batch-size", "16"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(alg: str, params: dict) -> dict:
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(params["INPUT"]), "input")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer, False)
    return processing.run(f"explora_geo:{alg}", {**params, "INPUT": layer}, context=QgsProcessingContext(),
                          feedback=QgsProcessingFeedback())


def _raster(path: str | Path) -> tuple[np.ndarray, tuple, str, Any]:
    ds = gdal.Open(str(path))
    band = ds.GetRasterBand(1)
    out = (ds.ReadAsArray(), ds.GetGeoTransform(), ds.GetProjection(),
           (band.GetNoDataValue(), band.GetCategoryNames(), band.GetColorTable() and
            [band.GetColorTable().GetColorEntry(i) for i in range(band.GetColorTable().GetCount())]))
    ds = None
    return out


def _rows(path: str | Path) -> list[dict]:
    source = ogr.Open(str(path))
    layer = source.GetLayer(0)
    rows = [{**f.items(), "_wkt": f.GetGeometryRef().ExportToWkt()} for f in layer]
    source = None
    return sorted(rows, key=lambda r: (r["tile_row"], r["tile_col"]))


def _with_nan(src: Path, dst: Path) -> Path:
    """A float32 GeoTIFF copy of a 256 x 128 px window of ``src`` with NaN scattered, in a block and at an edge."""
    ds = gdal.Translate(str(dst), str(src), srcWin=[256, 128, 256, 128], outputType=gdal.GDT_Float32)
    invalid = np.random.default_rng(3).random((128, 256)) < 0.03
    invalid[:40, :20] = True
    invalid[:, -3:] = True
    for i in range(1, ds.RasterCount + 1):
        band = ds.GetRasterBand(i)
        band.WriteArray(np.where(invalid, np.nan, band.ReadAsArray()))
    ds = None
    return dst


def test_predict_writes_the_plugins_classify_files(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                   tmp_path: Path) -> None:
    for data in (t33uuu_vrt, _with_nan(t33uuu_vrt, tmp_path / "nan.tif")):
        plugin = _run("classify", {"INPUT": data, "MODEL": str(bundle["classifier"]), "BATCH_SIZE": 16,
                                   "OUTPUT_GRID": str(tmp_path / f"{data.stem}_g.gpkg"),
                                   "OUTPUT_CLASSES": str(tmp_path / f"{data.stem}_c.tif"),
                                   "OUTPUT_PROBABILITY": str(tmp_path / f"{data.stem}_p.tif")})
        summary = _predict(bundle["classifier"], data, tmp_path / f"predict_{data.stem}")
        (entry,) = summary["inputs"]
        assert entry["tiles_run"] == plugin["TILES_RUN"] and entry["tiles_partial"] == plugin["TILES_PARTIAL"]
        out = tmp_path / f"predict_{data.stem}"
        for ours, theirs in ((out / f"{data.stem}_classes.tif", plugin["OUTPUT_CLASSES"]),
                             (out / f"{data.stem}_probability.tif", plugin["OUTPUT_PROBABILITY"])):
            a, b = _raster(ours), _raster(theirs)
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1:] == b[1:]  # georeferencing, nodata, category names, colour table
        assert _rows(out / f"{data.stem}_grid.gpkg") == _rows(plugin["OUTPUT_GRID"])
    assert plugin["TILES_PARTIAL"] > 0  # the NaN copy: partial tiles filled alike


def test_predict_writes_the_plugins_embeddings(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                               tmp_path: Path) -> None:
    plugin = _run("embed", {"INPUT": t33uuu_vrt, "MODEL": str(bundle["embedder"]), "BATCH_SIZE": 16,
                            "OUTPUT": str(tmp_path / "e.tif")})
    _predict(bundle["embedder"], t33uuu_vrt, tmp_path / "predict")
    ours = _raster(tmp_path / "predict" / f"{t33uuu_vrt.stem}_embedding.tif")
    theirs = _raster(plugin["OUTPUT"])
    np.testing.assert_array_equal(ours[0], theirs[0])
    assert ours[1:3] == theirs[1:3]


def test_predict_writes_the_plugins_segmentation(qgis_app: Any, segmenter_bundle: Path, t33uuu_vrt: Path,
                                                 tmp_path: Path) -> None:
    data = _with_nan(t33uuu_vrt, tmp_path / "nan.tif")
    plugin = _run("segment", {"INPUT": data, "MODEL": str(segmenter_bundle), "BATCH_SIZE": 16,
                              "OUTPUT_CLASSES": str(tmp_path / "s.tif")})
    summary = _predict(segmenter_bundle, data, tmp_path / "predict")
    assert summary["model_type"] == "segmenter" and summary["inputs"][0]["tiles_run"] == plugin["TILES_RUN"]
    ours, theirs = _raster(tmp_path / "predict" / "nan_segmentation.tif"), _raster(plugin["OUTPUT_CLASSES"])
    np.testing.assert_array_equal(ours[0], theirs[0])
    assert ours[1:] == theirs[1:]
    assert ours[0].shape == (128, 256) and (ours[0] == 255).any() and (ours[0] != 255).any()  # NaN pixels: nodata

"""``explora_geo:segment`` in headless QGIS on the real T33UUU scene, with a segmenter exported by
``explora-geo export --segmenter`` during the session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from osgeo import gdal
from test_algorithms import Feedback, _layer, _read, _run

X0, Y0 = 332000.0, 5820000.0  # top-left of the test area (EPSG:32633), 10 m pixels


def _direct_blend(vrt: Path, model_path: Path, width: int, height: int, overlap: float,
                  min_valid: float) -> tuple[np.ndarray, np.ndarray]:
    """The class map and top-class probability computed here without the plugin's run: every window of the area read with GDAL, scaled,
    nodata-filled, run in ONNX Runtime, and the logits blended pixel by pixel with the window weights."""
    import onnxruntime as ort
    from explora_geo_qgis.core.blending import window_weights
    from explora_geo_qgis.core.model import OnnxModel
    from explora_geo_qgis.core.tiling import TileGrid, fill_invalid

    model = OnnxModel(model_path, device="cpu")
    info = model.info
    grid = TileGrid.from_overlap(width, height, info.tile_size, overlap)
    ds = gdal.Open(str(vrt))
    names = [ds.GetRasterBand(i).GetDescription() for i in range(1, ds.RasterCount + 1)]
    order = [names.index(b) + 1 for b in info.bands]
    gt = ds.GetGeoTransform()
    col0, row0 = round((X0 - gt[0]) / gt[1]), round((Y0 - gt[3]) / gt[5])
    area = np.stack([ds.GetRasterBand(b).ReadAsArray(col0, row0, width, height) for b in order])
    ds = None
    t, s, m = grid.tile, grid.stride, grid.margin
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    weights = window_weights(t)
    acc = np.zeros((len(info.class_names), height, width))
    wsum = np.zeros((height, width))
    for r in range(grid.n_rows):
        for c in range(grid.n_cols):
            y0, x0 = r * s - m, c * s - m
            data = np.zeros((len(order), t, t), np.float32)
            valid = np.zeros((t, t), bool)
            ys, xs = slice(max(y0, 0), min(y0 + t, height)), slice(max(x0, 0), min(x0 + t, width))
            dy, dx = ys.start - y0, xs.start - x0
            data[:, dy:dy + ys.stop - ys.start, dx:dx + xs.stop - xs.start] = area[:, ys, xs]
            valid[dy:dy + ys.stop - ys.start, dx:dx + xs.stop - xs.start] = True
            inside = valid[dy:dy + ys.stop - ys.start, dx:dx + xs.stop - xs.start]  # judged on in-area pixels
            if inside.mean() < min_valid:
                continue
            tile = fill_invalid(info.scaler(data[None]), valid[None])
            logits = session.run(["logits"], {"image": tile})[0][0]
            part = (slice(None), slice(dy, dy + ys.stop - ys.start), slice(dx, dx + xs.stop - xs.start))
            acc[:, ys, xs] += (logits * weights)[part]
            wsum[ys, xs] += weights[part[1:]]
    out = np.full((height, width), 255, np.uint8)
    prob = np.full((height, width), -9999.0)
    covered = wsum > 0
    blended = acc[:, covered] / wsum[covered]
    out[covered] = blended.argmax(axis=0)
    p = np.exp(blended - blended.max(axis=0))
    prob[covered] = (p / p.sum(axis=0)).max(axis=0)
    return out, prob


def _categories(path: str) -> list[str]:
    """Category names of band 1 (via gdal.Info: this GDAL's Python GetCategoryNames() can return None)."""
    return gdal.Info(path, format="json")["bands"][0].get("categories")


@pytest.mark.parametrize("overlap", [0.0, 50.0])
def test_segment_classes_gsd_and_blending(qgis_app: Any, segmenter_bundle: Path, t33uuu_vrt: Path,
                                          tmp_path: Path, overlap: float) -> None:
    width, height = 112, 72  # not a multiple of the tile: edge windows reach beyond the area
    extent = f"{X0},{X0 + 10 * width},{Y0 - 10 * height},{Y0} [EPSG:32633]"
    feedback = Feedback.make()
    out = _run("segment", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(segmenter_bundle), "EXTENT": extent,
                           "OVERLAP": overlap, "BATCH_SIZE": 5, "MIN_VALID": 0.1, "OUTPUT_CLASSES": str(tmp_path / "classes.tif"),
                           "OUTPUT_PROBABILITY": str(tmp_path / "prob.tif")}, feedback)
    ds = gdal.Open(out["OUTPUT_CLASSES"])
    assert (ds.RasterXSize, ds.RasterYSize) == (width, height)
    assert ds.GetGeoTransform() == (X0, 10.0, 0.0, Y0, 0.0, -10.0)  # the model's GSD
    assert ds.GetSpatialRef().GetAuthorityCode(None) == "32633"
    band = ds.GetRasterBand(1)
    assert _categories(out["OUTPUT_CLASSES"]) == ["water", "land"] and band.GetNoDataValue() == 255
    assert band.GetColorTable().GetColorEntry(1)[:3] == (0xB2, 0xDF, 0x8A)
    classes = band.ReadAsArray()
    ds = None
    prob = _read(out["OUTPUT_PROBABILITY"])
    assert set(np.unique(classes)) <= {0, 1} and (prob >= 0.5).all() and (prob <= 1.0).all()
    expected, expected_prob = _direct_blend(t33uuu_vrt, segmenter_bundle, width, height, overlap / 100.0, 0.1)
    agree = (classes == expected).mean()
    assert agree > 0.999, agree  # ties at 1e-7 may flip a pixel; nothing else differs
    np.testing.assert_allclose(prob, expected_prob, rtol=0, atol=1e-4)
    assert np.ptp(prob) > 0.01  # the map is not constant
    assert out["PIXELS_CLASSIFIED"] == width * height and out["TILES_RUN"] > 0
    assert any("pixels per class" in m for m in feedback.infos)


def test_segment_nodata_pixels(qgis_app: Any, segmenter_bundle: Path, t33uuu_vrt: Path, tmp_path: Path) -> None:
    """A float32 copy with a NaN block and a few NaN pixels: those pixels are nodata, the rest classified."""
    src = gdal.Translate(str(tmp_path / "f.tif"), str(t33uuu_vrt), srcWin=[200, 100, 96, 64],
                         outputType=gdal.GDT_Float32)
    for b in range(1, src.RasterCount + 1):
        band = src.GetRasterBand(b)
        values = band.ReadAsArray()
        values[10:20, 30:50] = np.nan
        values[40, 5] = np.nan
        band.WriteArray(values)
    src = None
    out = _run("segment", {"INPUT": _layer(tmp_path / "f.tif", "float"), "MODEL": str(segmenter_bundle),
                           "OUTPUT_CLASSES": str(tmp_path / "c.tif")})
    classes = _read(out["OUTPUT_CLASSES"])
    assert classes.shape == (64, 96)
    assert (classes[10:20, 30:50] == 255).all() and classes[40, 5] == 255
    assert (classes != 255).sum() == 96 * 64 - 200 - 1


def test_classifier_bundle_is_refused(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException) as err:
        _run("segment", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["classifier"]),
                         "OUTPUT_CLASSES": str(tmp_path / "c.tif")})
    message = str(err.value)
    assert "classifier.onnx is a classifier, not a segmenter" in message and "\n" not in message
    assert not (tmp_path / "c.tif").exists()


def test_segment_geographic_layer(qgis_app: Any, segmenter_bundle: Path, t33uuu_vrt: Path, tmp_path: Path) -> None:
    """A float32 EPSG:4326 copy with NaN outside its footprint: the map comes out in the UTM zone at the model's
    10 m, NaN corners nodata, the rest classified, over the original's footprint."""
    gdal.Translate(str(tmp_path / "utm.tif"), str(t33uuu_vrt), srcWin=[300, 200, 160, 96]).FlushCache()
    gdal.Warp(str(tmp_path / "geo.tif"), str(tmp_path / "utm.tif"), dstSRS="EPSG:4326", outputType=gdal.GDT_Float32,
              dstNodata=float("nan"), resampleAlg="bilinear")
    geo = _run("segment", {"INPUT": _layer(tmp_path / "geo.tif", "geo"), "MODEL": str(segmenter_bundle),
                           "MIN_VALID": 0.3, "OUTPUT_CLASSES": str(tmp_path / "geo_classes.tif")})
    ds = gdal.Open(geo["OUTPUT_CLASSES"])
    assert ds.GetSpatialRef().GetAuthorityCode(None) == "32633"
    gt = ds.GetGeoTransform()
    assert gt[1] == pytest.approx(10.0) and gt[5] == pytest.approx(-10.0)
    classes = ds.GetRasterBand(1).ReadAsArray()
    ds = None
    done = classes != 255
    assert 0.6 < done.mean() < 1.0  # the NaN corners of the rotated footprint are nodata
    # the classified pixels lie over the original's footprint
    src = gdal.Open(str(tmp_path / "utm.tif"))
    x0, px, _, y0, _, py = src.GetGeoTransform()
    w, h = src.RasterXSize, src.RasterYSize
    src = None
    rows, cols = np.nonzero(done)
    xs, ys = gt[0] + (cols + 0.5) * gt[1], gt[3] + (rows + 0.5) * gt[5]
    assert (xs > x0 - 20).all() and (xs < x0 + w * px + 20).all()
    assert (ys < y0 + 20).all() and (ys > y0 + h * py - 20).all()

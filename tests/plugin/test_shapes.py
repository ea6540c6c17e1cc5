"""Every algorithm on the raster shapes analysts bring, built from the real T33UUU scene: each either gives the
same numbers as the plain uint16 (nodata=0) copy of the same pixels, or refuses with one line and writes nothing.

Shapes: float32 with NaN edges and scattered NaN; 0-1 reflectance (refused, then equal with SCALE); a VRT; bands
described ``B1``..``B12``, ``B8A`` plus extra bands in another order; user no-data ranges set on the layer; int16
with a negative nodata; EPSG:4326 of odd size; smaller than a tile; all nodata; a band of the bundle missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from osgeo import gdal

from test_algorithms import Feedback, _layer, _read, _run

WIN = [256, 128, 128, 96]  # 4 x 3 tiles of 32 px at 10 m
X0, Y1 = 330000.0 + WIN[0] * 10, 5822040.0 - WIN[1] * 10
ALGORITHMS = ("classify", "embed", "similarity", "change", "cluster", "segment", "classify_from_examples")
#: the output compared between shapes, per algorithm
MAIN = {"classify": "OUTPUT_CLASSES", "embed": "OUTPUT", "similarity": "OUTPUT", "change": "OUTPUT",
        "cluster": "OUTPUT", "segment": "OUTPUT_CLASSES", "classify_from_examples": "OUTPUT_CLASSES"}


def _invalid() -> np.ndarray:
    invalid = np.random.default_rng(3).random((WIN[3], WIN[2])) < 0.02  # scattered
    invalid[:, :3] = invalid[-2:, :] = True  # NaN edges
    invalid[40:60, 70:90] = True  # a block: partial tiles
    invalid[:32, 96:] = True  # tile (0, 3): nodata in every output
    return invalid


def _copy(src: Path, path: Path, dtype: int, nodata: float | None = None, edit: Any = None, fmt: str = "GTiff",
          bands: list[int] | None = None, names: list[str] | None = None) -> Path:
    ds_src = gdal.Open(str(src))
    ds = gdal.Translate(str(path), ds_src, format=fmt, outputType=dtype, srcWin=WIN, bandList=bands)
    for i in range(1, ds.RasterCount + 1):
        band = ds.GetRasterBand(i)
        if nodata is not None:
            band.SetNoDataValue(nodata)
        if edit is not None:
            band.WriteArray(edit(band.ReadAsArray()))
        band.SetDescription(names[i - 1] if names else ds_src.GetRasterBand(bands[i - 1] if bands else i)
                            .GetDescription())
    ds = ds_src = None
    return path


def _points(rows_cols: list[tuple[int, int, str]]) -> Any:
    from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsProject, QgsVectorLayer
    from qgis.PyQt.QtCore import QVariant

    layer = QgsVectorLayer("Point?crs=EPSG:32633", "examples", "memory")
    layer.dataProvider().addAttributes([QgsField("cls", QVariant.String)])
    layer.updateFields()
    features = []
    for r, c, cls in rows_cols:
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromWkt(f"POINT({X0 + c * 320 + 160} {Y1 - r * 320 - 160})"))
        feature["cls"] = cls
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    QgsProject.instance().addMapLayer(layer, False)
    return layer


def run_all(path: Path, bundle: dict, segmenter: Path, out: Path, layer: Any = None, **extra: Any) -> dict:
    """Every algorithm on ``path``: algorithm -> its result dict, or the one-line refusal (str)."""
    from qgis.core import QgsProcessingException

    layer = layer or _layer(path, path.stem)
    examples = _points([(0, 0, "a"), (0, 1, "a"), (1, 0, "a"), (2, 2, "b"), (2, 3, "b"), (1, 3, "b")])
    common = {"INPUT": layer, "MODEL": str(bundle["embedder"]), **extra}
    params = {
        "classify": {**common, "MODEL": str(bundle["classifier"]), "OUTPUT_GRID": str(out / "g.gpkg"),
                     "OUTPUT_CLASSES": str(out / "c.tif"), "OUTPUT_PROBABILITY": str(out / "p.tif")},
        "embed": {**common, "OUTPUT": str(out / "e.tif")},
        "similarity": {**common, "REFERENCE": _points([(1, 1, "r")]), "OUTPUT": str(out / "s.tif")},
        "change": {**{k: v for k, v in common.items() if k != "INPUT"}, "BEFORE": layer, "AFTER": layer,
                   "OUTPUT": str(out / "ch.tif")},
        "cluster": {**common, "CLUSTERS": 2, "OUTPUT": str(out / "k.tif")},
        "segment": {**common, "MODEL": str(segmenter), "OUTPUT_CLASSES": str(out / "sg.tif")},
        "classify_from_examples": {**common, "EXAMPLES": examples, "CLASS_FIELD": "cls",
                                   "OUTPUT_GRID": str(out / "fg.gpkg"), "OUTPUT_CLASSES": str(out / "fc.tif"),
                                   "OUTPUT_PROBABILITY": str(out / "fp.tif")},
    }
    out.mkdir(exist_ok=True)
    results: dict = {}
    for alg in ALGORITHMS:
        before = set(out.iterdir())
        try:
            results[alg] = _run(alg, params[alg], Feedback.make())
        except QgsProcessingException as err:
            assert "\n" not in str(err) and "Traceback" not in str(err), (alg, str(err))
            assert set(out.iterdir()) == before, f"{alg} refused but wrote {set(out.iterdir()) - before}"
            results[alg] = str(err)
    return results


def _main(result: dict, alg: str) -> np.ndarray:
    return _read(result[MAIN[alg]], None)


def _nodata_mask(result: dict, alg: str) -> np.ndarray:
    """Where the main output of ``alg`` is nodata (any band), by the file's own nodata value."""
    ds = gdal.Open(result[MAIN[alg]])
    nodata = ds.GetRasterBand(1).GetNoDataValue()
    values = ds.ReadAsArray()
    ds = None
    assert nodata is not None, alg
    values = values.reshape(-1, *values.shape[-2:])
    return (values == nodata).any(axis=0)


def _assert_consistent(results: dict) -> np.ndarray:
    """The tile algorithms agree on which tiles are nodata, and change of a raster with itself is 0; returns
    the nodata tiles."""
    masks = {alg: _nodata_mask(results[alg], alg) for alg in ALGORITHMS if alg != "segment"}
    first = masks["classify"]
    for alg, mask in masks.items():
        np.testing.assert_array_equal(mask, first, err_msg=alg)
    change = _main(results["change"], "change")
    if (~first).sum() >= 2:
        np.testing.assert_allclose(change[~first], 0.0, atol=1e-5)
    return first


@pytest.fixture(scope="module")
def reference(qgis_app: Any, bundle: dict, segmenter_bundle: Path, t33uuu_vrt: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The plain uint16 copy with nodata=0 where the shapes have NaN / nodata."""
    tmp = tmp_path_factory.mktemp("reference")
    invalid = _invalid()
    with_nodata = _copy(t33uuu_vrt, tmp / "u16.tif", gdal.GDT_UInt16, 0, lambda v: np.where(invalid, 0, v))
    plain = _copy(t33uuu_vrt, tmp / "plain.tif", gdal.GDT_UInt16)
    return {"nodata": run_all(with_nodata, bundle, segmenter_bundle, tmp / "a"),
            "plain": run_all(plain, bundle, segmenter_bundle, tmp / "b")}


def _assert_equal(got: dict, ref: dict) -> None:
    _assert_consistent(got)
    for alg in ALGORITHMS:
        assert isinstance(ref[alg], dict), (alg, ref[alg])
        assert isinstance(got[alg], dict), (alg, got[alg])
        a, b = _main(got[alg], alg), _main(ref[alg], alg)
        assert a.shape == b.shape, alg
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=alg)


def _shape(name: str, src: Path, tmp: Path) -> tuple[Path, dict]:
    """The raster of shape ``name`` and extra parameters; what it must equal is in the test."""
    invalid = _invalid()
    if name == "float32_nan":
        return _copy(src, tmp / "f32.tif", gdal.GDT_Float32, edit=lambda v: np.where(invalid, np.nan, v)), {}
    if name == "reflectance_scaled":
        return _copy(src, tmp / "refl.tif", gdal.GDT_Float32,
                     edit=lambda v: np.where(invalid, np.nan, v / 10000.0)), {"SCALE": 10000}
    if name == "int16_negative_nodata":
        return _copy(src, tmp / "i16.tif", gdal.GDT_Int16, -9999, lambda v: np.where(invalid, -9999, v)), {}
    if name == "vrt":
        return _copy(src, tmp / "crop.vrt", gdal.GDT_UInt16, fmt="VRT"), {}
    if name == "renamed_extra_bands":
        # file order: B8A, extra, B12..B1 reversed, extra; described B1..B12 (no leading zero) and B8A
        order = [13, 1, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 2]
        names = ["B8A", "NDVI"] + [f"B{i}" for i in range(12, 0, -1)] + ["SCL"]
        return _copy(src, tmp / "renamed.tif", gdal.GDT_UInt16, bands=order, names=names), {}
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["float32_nan", "reflectance_scaled", "int16_negative_nodata"])
def test_invalid_pixel_shapes_equal_the_nodata_copy(qgis_app: Any, bundle: dict, segmenter_bundle: Path,
                                                    t33uuu_vrt: Path, tmp_path: Path, reference: dict,
                                                    name: str) -> None:
    path, extra = _shape(name, t33uuu_vrt, tmp_path)
    _assert_equal(run_all(path, bundle, segmenter_bundle, tmp_path / "o", **extra), reference["nodata"])


@pytest.mark.parametrize("name", ["vrt", "renamed_extra_bands"])
def test_valid_shapes_equal_the_plain_copy(qgis_app: Any, bundle: dict, segmenter_bundle: Path, t33uuu_vrt: Path,
                                           tmp_path: Path, reference: dict, name: str) -> None:
    path, extra = _shape(name, t33uuu_vrt, tmp_path)
    _assert_equal(run_all(path, bundle, segmenter_bundle, tmp_path / "o", **extra), reference["plain"])


def test_reference_has_nodata_where_a_tile_is_invalid(reference: dict) -> None:
    nodata = _assert_consistent(reference["nodata"])
    expected = np.zeros((3, 4), bool)
    expected[0, 3] = True
    np.testing.assert_array_equal(nodata, expected)
    assert not _assert_consistent(reference["plain"]).any()
    segments = _main(reference["nodata"]["segment"], "segment")
    invalid = _invalid()
    assert (segments[invalid] == 255).all()
    # valid pixels are nodata only where every 50 %-overlap window covering them (the corner ones reach 8 px
    # beyond the raster, outside pixels count as invalid) is below MIN_VALID: within 8 px of the border
    lost = (segments == 255) & ~invalid
    inner = np.zeros_like(lost)
    inner[8:-8, 8:-8] = True
    assert not (lost & inner).any() and lost.sum() < 100


def test_user_nodata_ranges_equal_the_nodata_copy(qgis_app: Any, bundle: dict, segmenter_bundle: Path,
                                                  t33uuu_vrt: Path, tmp_path: Path, reference: dict) -> None:
    from qgis.core import QgsRasterRange

    invalid = _invalid()
    path = _copy(t33uuu_vrt, tmp_path / "user.tif", gdal.GDT_UInt16, edit=lambda v: np.where(invalid, 60000, v))
    layer = _layer(path, "user")
    for band in range(1, layer.bandCount() + 1):
        layer.dataProvider().setUserNoDataValue(band, [QgsRasterRange(59000, 61000)])
    _assert_equal(run_all(path, bundle, segmenter_bundle, tmp_path / "o", layer=layer), reference["nodata"])


@pytest.mark.parametrize("name", ["reflectance_unscaled", "missing_band"])
def test_refused_with_the_fix_by_every_algorithm(qgis_app: Any, bundle: dict, segmenter_bundle: Path,
                                                 t33uuu_vrt: Path, tmp_path: Path, name: str) -> None:
    if name == "reflectance_unscaled":
        path = _copy(t33uuu_vrt, tmp_path / "refl.tif", gdal.GDT_Float32, edit=lambda v: v / 10000.0)
        fix = "SCALE=10000"
    else:  # 12 of the 13 bands: B05 left out
        path = _copy(t33uuu_vrt, tmp_path / "no_b05.tif", gdal.GDT_UInt16, bands=[1, 2, 3, 4, 6, 7, 8, 9, 10,
                                                                                   11, 12, 13])
        fix = "B05"
    results = run_all(path, bundle, segmenter_bundle, tmp_path / "o")
    for alg in ALGORITHMS:
        assert isinstance(results[alg], str) and fix in results[alg], (alg, results[alg])
    assert not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("name", ["smaller_than_a_tile", "all_nodata"])
def test_nothing_to_process_gives_all_nodata_outputs(qgis_app: Any, bundle: dict, segmenter_bundle: Path,
                                                     t33uuu_vrt: Path, tmp_path: Path, name: str) -> None:
    if name == "smaller_than_a_tile":  # 20 x 13 px, over tile (0, 0) of the examples' grid
        ds = gdal.Translate(str(tmp_path / "small.tif"), str(t33uuu_vrt), srcWin=[WIN[0], WIN[1], 20, 13])
        ds = None
        path = tmp_path / "small.tif"
    else:
        path = _copy(t33uuu_vrt, tmp_path / "nan.tif", gdal.GDT_Float32, edit=lambda v: np.full_like(v, np.nan))
    results = run_all(path, bundle, segmenter_bundle, tmp_path / "o")
    for alg in ALGORITHMS:
        if alg == "classify_from_examples" and isinstance(results[alg], str):
            continue  # checked below
        assert isinstance(results[alg], dict), (alg, results[alg])
        assert _nodata_mask(results[alg], alg).all() if alg != "segment" else \
            (_main(results[alg], alg) == 255).all(), alg
    assert "example" in str(results["classify_from_examples"]) or \
        _nodata_mask(results["classify_from_examples"], "classify_from_examples").all()


def test_epsg4326_of_odd_size(qgis_app: Any, bundle: dict, segmenter_bundle: Path, t33uuu_vrt: Path,
                              tmp_path: Path) -> None:
    """A degree export (float32, NaN outside the warp) of odd size: every algorithm runs, they agree on the
    nodata tiles, change with itself is 0 and the segments cover the valid pixels."""
    crop = _copy(t33uuu_vrt, tmp_path / "crop.tif", gdal.GDT_UInt16)
    ds = gdal.Warp(str(tmp_path / "wgs84.tif"), str(crop), options=gdal.WarpOptions(
        format="GTiff", dstSRS="EPSG:4326", width=97, height=41, outputType=gdal.GDT_Float32,
        dstNodata=float("nan")))
    source = gdal.Open(str(t33uuu_vrt))
    for i in range(1, ds.RasterCount + 1):
        ds.GetRasterBand(i).SetDescription(source.GetRasterBand(i).GetDescription())
    ds = source = None
    results = run_all(tmp_path / "wgs84.tif", bundle, segmenter_bundle, tmp_path / "o")
    nodata = _assert_consistent(results)
    assert (~nodata).sum() >= 4
    assert results["classify"]["TILES_RUN"] == results["cluster"]["TILES_RUN"] == int((~nodata).sum())


@pytest.mark.parametrize(("alg", "cancel_at"), [("change", 20.0), ("change", 70.0), ("cluster", 40.0),
                                                ("segment", 40.0), ("classify_from_examples", 40.0),
                                                ("cluster", 100.0), ("classify_from_examples", 100.0)])
def test_cancel_mid_run_leaves_nothing(qgis_app: Any, bundle: dict, segmenter_bundle: Path, t33uuu_vrt: Path,
                                       tmp_path: Path, alg: str, cancel_at: float) -> None:
    """Cancelled while reading/running (or, at 100 %, after the last tile, before writing): one line, no file."""
    from qgis.core import QgsProcessingException

    out = tmp_path / "o"
    out.mkdir()
    layer = _layer(t33uuu_vrt)
    common = {"INPUT": layer, "MODEL": str(bundle["embedder"]), "BATCH_SIZE": 16}
    params = {
        "change": {"BEFORE": layer, "AFTER": layer, "MODEL": str(bundle["embedder"]), "BATCH_SIZE": 16,
                   "OUTPUT": str(out / "ch.tif"), "OUTPUT_GRID": str(out / "ch.gpkg")},
        "cluster": {**common, "CLUSTERS": 3, "OUTPUT": str(out / "k.tif")},
        "segment": {**common, "MODEL": str(segmenter_bundle), "OUTPUT_CLASSES": str(out / "sg.tif"),
                    "OUTPUT_PROBABILITY": str(out / "sp.tif")},
        "classify_from_examples": {
            **common, "EXAMPLES": _points([(0, 0, "a"), (0, 1, "a"), (2, 2, "b"), (2, 3, "b")]),
            "CLASS_FIELD": "cls", "OUTPUT_GRID": str(out / "g.gpkg"), "OUTPUT_CLASSES": str(out / "c.tif"),
            "OUTPUT_PROBABILITY": str(out / "p.tif"), "OUTPUT_MODEL": str(out / "m.onnx")},
    }[alg]
    feedback = Feedback.make(cancel_at=cancel_at)
    with pytest.raises(QgsProcessingException, match="^cancelled by the user") as err:
        _run(alg, params, feedback)
    assert "\n" not in str(err.value)
    assert feedback.progress[-1] >= cancel_at and (cancel_at == 100.0 or feedback.progress[-1] < 100.0)
    assert list(out.iterdir()) == []

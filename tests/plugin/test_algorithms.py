"""End-to-end runs of the explora_geo Processing algorithms in headless QGIS 3.22 on the real T33UUU scene,
with models exported by ``explora-geo export`` during the test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from osgeo import gdal, ogr

SCENE_EXTENT = (330000.0, 5814360.0, 345360.0, 5822040.0)  # T33UUU crop, EPSG:32633 (xmin, ymin, xmax, ymax)


def _layer(path: Path, name: str = "t33uuu") -> Any:
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid(), path
    # the project owns (and at session end deletes) the layer, so none outlives QGIS
    QgsProject.instance().addMapLayer(layer, False)
    return layer


class Feedback:
    """Factory of QgsProcessingFeedback subclasses recording messages (optionally cancelling)."""

    @staticmethod
    def make(cancel_at: float | None = None) -> Any:
        from qgis.core import QgsProcessingFeedback

        class Recording(QgsProcessingFeedback):
            def __init__(self) -> None:
                super().__init__()
                self.infos: list[str] = []
                self.progress: list[float] = []
                self.setProgress = self._progress  # the core reports through feedback.setProgress

            def _progress(self, value: float) -> None:
                self.progress.append(value)
                QgsProcessingFeedback.setProgress(self, value)
                if cancel_at is not None and value >= cancel_at:
                    self.cancel()

            def pushInfo(self, info: str) -> None:  # noqa: N802 (QGIS API)
                self.infos.append(info)

        return Recording()


def _run(alg: str, params: dict, feedback: Any = None) -> dict:
    import processing
    from qgis.core import QgsProcessingContext

    context = QgsProcessingContext()
    return processing.run(f"explora_geo:{alg}", params, context=context, feedback=feedback or Feedback.make())


def _read(path: str, band: int | None = 1) -> np.ndarray:
    """One band (or all bands with ``band=None``) of a raster (the dataset stays open while reading)."""
    ds = gdal.Open(path)
    values = ds.ReadAsArray() if band is None else ds.GetRasterBand(band).ReadAsArray()
    ds = None
    return values


def _features(path: str) -> list[dict]:
    source = ogr.Open(path)
    layer = source.GetLayer(0)
    rows = [{**f.items(), "_env": f.GetGeometryRef().GetEnvelope()} for f in layer]
    source = None
    return rows


def test_provider_registered(qgis_app: Any) -> None:
    from qgis.core import QgsApplication

    provider = QgsApplication.processingRegistry().providerById("explora_geo")
    assert provider is not None
    assert sorted(a.id() for a in provider.algorithms()) == [
        "explora_geo:change", "explora_geo:classify", "explora_geo:classify_from_examples", "explora_geo:cluster",
        "explora_geo:embed", "explora_geo:segment", "explora_geo:similarity"]


def test_classify_whole_scene(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    feedback = Feedback.make()
    out = _run("classify", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["classifier"]), "BATCH_SIZE": 64,
                            "OUTPUT_GRID": str(tmp_path / "grid.gpkg"), "OUTPUT_CLASSES": str(tmp_path / "c.tif"),
                            "OUTPUT_PROBABILITY": str(tmp_path / "p.tif")}, feedback)
    # 1536 x 768 px at 10 m, 32 px tiles -> 48 x 24 cells of 320 m
    assert out["TILES_RUN"] == 48 * 24
    classes = gdal.Open(out["OUTPUT_CLASSES"])
    assert (classes.RasterXSize, classes.RasterYSize, classes.RasterCount) == (48, 24, 1)
    assert classes.GetGeoTransform() == (330000.0, 320.0, 0.0, 5822040.0, 0.0, -320.0)
    assert classes.GetSpatialRef().GetAuthorityCode(None) == "32633"
    band = classes.GetRasterBand(1)
    assert band.GetCategoryNames() == ["water", "vegetation", "built-up"]
    assert band.GetColorTable().GetColorEntry(0)[:3] == (0x1F, 0x78, 0xB4)
    ids = band.ReadAsArray()
    prob = _read(out["OUTPUT_PROBABILITY"])
    rows = _features(out["OUTPUT_GRID"])
    assert len(rows) == 48 * 24
    names = ["water", "vegetation", "built-up"]
    for row in rows:
        p = np.array([row["p_water"], row["p_vegetation"], row["p_built_up"]])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["class_id"] == int(p.argmax()) == ids[row["tile_row"], row["tile_col"]]
        assert row["class_name"] == names[row["class_id"]]
        assert row["probability"] == pytest.approx(p.max(), abs=1e-6)
        assert prob[row["tile_row"], row["tile_col"]] == pytest.approx(p.max(), abs=1e-6)
        assert row["valid_frac"] == 1.0 and row["status"] == "ok"
    xmin = min(r["_env"][0] for r in rows), max(r["_env"][1] for r in rows)
    assert xmin == (SCENE_EXTENT[0], SCENE_EXTENT[2])
    assert np.ptp(prob) > 0  # real data: the tiles differ
    # logs: speed and execution provider
    assert any("tiles/s" in m and "CPUExecutionProvider" in m for m in feedback.infos)
    assert feedback.progress[-1] == pytest.approx(100.0)
    # the categorized style is stored in the GeoPackage as its default
    source = ogr.Open(out["OUTPUT_GRID"])
    styles = source.GetLayerByName("layer_styles")
    assert styles is not None and styles.GetFeatureCount() == 1
    source = None


def test_classify_loads_styled_layers(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    import processing
    from qgis.core import QgsProcessingContext, QgsProject, QgsVectorLayer

    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    params = {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["classifier"]),
              "EXTENT": "330000,333200,5818840,5822040 [EPSG:32633]", "OUTPUT_GRID": str(tmp_path / "g.gpkg"),
              "OUTPUT_CLASSES": str(tmp_path / "c.tif"), "OUTPUT_PROBABILITY": str(tmp_path / "p.tif")}
    processing.runAndLoadResults("explora_geo:classify", params, context=context, feedback=Feedback.make())
    layers = QgsProject.instance().mapLayers().values()
    grid = next(lay for lay in layers if isinstance(lay, QgsVectorLayer))
    renderer = grid.renderer()
    assert renderer.type() == "categorizedSymbol" and renderer.classAttribute() == "class_id"
    assert [c.label() for c in renderer.categories()][:3] == ["water", "vegetation", "built-up"]
    QgsProject.instance().removeAllMapLayers()
    del grid, renderer, layers
    # reopened later, the GeoPackage brings its default style
    again = QgsVectorLayer(str(tmp_path / "g.gpkg"), "again", "ogr")
    assert again.renderer().type() == "categorizedSymbol"
    del again


@pytest.fixture()
def scene_with_nodata(t33uuu_vrt: Path, tmp_path: Path) -> Path:
    """The real scene as a GeoTIFF with nodata = 0 whose left 500 columns were blanked out (nodata)."""
    path = tmp_path / "nodata.tif"
    src = gdal.Open(str(t33uuu_vrt))
    ds = gdal.Translate(str(path), src, noData=0, creationOptions=["TILED=YES"])
    for i in range(1, ds.RasterCount + 1):
        band = ds.GetRasterBand(i)
        band.WriteArray(np.zeros((ds.RasterYSize, 500), dtype=np.uint16), 0, 0)
        band.SetDescription(src.GetRasterBand(i).GetDescription())
    ds = src = None
    return path


def test_nodata_tiles_are_skipped_not_classified(qgis_app: Any, bundle: dict, scene_with_nodata: Path,
                                                 tmp_path: Path) -> None:
    out = _run("classify", {"INPUT": _layer(scene_with_nodata), "MODEL": str(bundle["classifier"]),
                            "EXTENT": "330000,340240,5819480,5822040 [EPSG:32633]", "MIN_VALID": 0.5,
                            "OUTPUT_GRID": str(tmp_path / "g.gpkg"), "OUTPUT_CLASSES": str(tmp_path / "c.tif"),
                            "OUTPUT_PROBABILITY": str(tmp_path / "p.tif")})
    rows = {(r["tile_row"], r["tile_col"]): r for r in _features(out["OUTPUT_GRID"])}
    ids = _read(out["OUTPUT_CLASSES"])
    # 500 px of nodata: tile columns 0..14 (px 0..479) are empty, column 15 (480..511) is 20/32 nodata
    for (r, c), row in rows.items():
        if c < 15:
            assert row["status"] == "nodata" and row["class_id"] == -1 and row["probability"] is None
            assert row["valid_frac"] == 0.0 and ids[r, c] == 255
        elif c == 15:
            assert row["valid_frac"] == pytest.approx(12 / 32) and row["status"] == "nodata"
        else:
            assert row["status"] == "ok" and row["class_id"] >= 0
    assert out["TILES_RUN"] == 8 * (32 - 16)


def test_mask_polygon_limits_processing(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    mask = QgsVectorLayer("Polygon?crs=EPSG:32633", "mask", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POLYGON((331000 5821000, 332280 5821000, 332280 5822040, "
                                             "331000 5822040, 331000 5821000))"))
    mask.dataProvider().addFeatures([feature])
    out = _run("embed", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]), "MASK": mask,
                         "MIN_VALID": 0.99, "OUTPUT": str(tmp_path / "e.tif")})
    ds = gdal.Open(out["OUTPUT"])
    # area = mask bbox: 1280 m x 1040 m -> 4 x 4 cells of 320 m; the last tile row has 8 of its 32 px rows inside
    # the area, all valid: judged on its in-area pixels it passes MIN_VALID 0.99 (the part beyond is padding)
    assert ds.GetGeoTransform() == (331000.0, 320.0, 0.0, 5822040.0, 0.0, -320.0)
    assert (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) == (4, 4, 64)
    first = ds.GetRasterBand(1).ReadAsArray()
    assert (first != -9999.0).all()
    assert out["TILES_RUN"] == 16


def test_embed_and_similarity(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    extent = "330000,332560,5819480,5822040 [EPSG:32633]"  # 8 x 8 cells
    emb = _run("embed", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["classifier"]), "EXTENT": extent,
                         "OUTPUT": str(tmp_path / "e.tif")})
    ds = gdal.Open(emb["OUTPUT"])
    assert (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) == (8, 8, 64)
    assert ds.GetRasterBand(1).GetDescription() == "emb_000"
    vectors = ds.ReadAsArray().transpose(1, 2, 0)  # [8, 8, 64]
    point = QgsVectorLayer("Point?crs=EPSG:32633", "ref", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POINT(330500 5821500)"))  # cell row 1, col 1
    point.dataProvider().addFeatures([feature])
    for mode, centre in ((1, 0.0), (0, vectors.reshape(-1, 64).mean(axis=0))):  # raw cosine, centred
        sim = _run("similarity", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]), "EXTENT": extent,
                                  "REFERENCE": point, "MODE": mode, "OUTPUT": str(tmp_path / f"s{mode}.tif")})
        values = _read(sim["OUTPUT"])
        assert sim["REFERENCE_TILES"] == 1 and values.shape == (8, 8)
        centred = vectors - centre
        ref = centred[1, 1] / np.linalg.norm(centred[1, 1])
        expected = centred @ ref / np.linalg.norm(centred, axis=-1)
        np.testing.assert_allclose(values, expected, atol=1e-5)
        assert values[1, 1] == pytest.approx(1.0, abs=1e-5) and values.max() == pytest.approx(1.0, abs=1e-5)


def test_geographic_layer_is_processed_in_utm(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                             tmp_path: Path) -> None:
    wgs84 = tmp_path / "wgs84.tif"
    src = gdal.Open(str(t33uuu_vrt))
    warped = gdal.Warp(str(wgs84), src, options=gdal.WarpOptions(
        format="GTiff", dstSRS="EPSG:4326", dstNodata=0, outputBounds=(12.55, 52.46, 12.62, 52.50),
        outputBoundsSRS="EPSG:4326", xRes=0.0001, yRes=0.0001, resampleAlg="near"))
    del warped  # closes the file
    src = gdal.Open(str(t33uuu_vrt))
    ds = gdal.Open(str(wgs84), gdal.GA_Update)
    for i in range(1, ds.RasterCount + 1):
        ds.GetRasterBand(i).SetDescription(src.GetRasterBand(i).GetDescription())
    ds = None
    feedback = Feedback.make()
    out = _run("classify", {"INPUT": _layer(wgs84), "MODEL": str(bundle["classifier"]),
                            "OUTPUT_GRID": str(tmp_path / "g.gpkg"), "OUTPUT_CLASSES": str(tmp_path / "c.tif"),
                            "OUTPUT_PROBABILITY": str(tmp_path / "p.tif")}, feedback)
    result = gdal.Open(out["OUTPUT_CLASSES"])
    assert result.GetSpatialRef().GetAuthorityCode(None) == "32633"
    _, px, _, _, _, py = result.GetGeoTransform()
    assert (px, py) == (320.0, -320.0)  # metres, not degrees
    # 0.07 deg lon x 0.04 deg lat at 52.5 N is about 4.75 km x 4.45 km (UTM bbox slightly larger)
    assert 4700 <= result.RasterXSize * px <= 5300 and 4400 <= result.RasterYSize * -py <= 5000
    assert any("working in EPSG:32633" in m for m in feedback.infos)
    rows = _features(out["OUTPUT_GRID"])
    ran = [r for r in rows if r["status"] != "nodata"]
    assert ran and all(abs(r["p_water"] + r["p_vegetation"] + r["p_built_up"] - 1) < 1e-5 for r in ran)


def test_too_few_bands_names_the_missing_ones(qgis_app: Any, bundle: dict, t33uuu_files: dict,
                                              vrt_builder: Any, tmp_path: Path) -> None:
    from qgis.core import QgsProcessingException

    names = ["B02", "B03", "B04"]
    rgb = vrt_builder([t33uuu_files[b] for b in names], tmp_path / "rgb.vrt", names)
    with pytest.raises(QgsProcessingException, match=r"lacks band\(s\) B08, B05, B06, B07, B8A, B11, B12"):
        _run("embed", {"INPUT": _layer(rgb, "rgb"), "MODEL": str(bundle["embedder"]),
                       "OUTPUT": str(tmp_path / "e.tif")})
    assert not (tmp_path / "e.tif").exists()


def test_band_mapping_by_position_and_override(qgis_app: Any, bundle: dict, t33uuu_files: dict,
                                               vrt_builder: Any, tmp_path: Path) -> None:
    model_order = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    extent = "330000,331280,5820760,5822040 [EPSG:32633]"
    named = vrt_builder([t33uuu_files[b] for b in model_order], tmp_path / "named.vrt", model_order)
    unnamed = vrt_builder([t33uuu_files[b] for b in model_order], tmp_path / "unnamed.vrt", [])
    swapped_files = [t33uuu_files[b] for b in ["B03", "B02", *model_order[2:]]]
    swapped = vrt_builder(swapped_files, tmp_path / "swapped.vrt", [])
    outs = {}
    for name, path, mapping in (("named", named, ""), ("unnamed", unnamed, ""),
                                ("swapped", swapped, "B02=2, B03=1")):
        outs[name] = _run("embed", {"INPUT": _layer(path, name), "MODEL": str(bundle["embedder"]),
                                    "EXTENT": extent, "BAND_MAPPING": mapping,
                                    "OUTPUT": str(tmp_path / f"{name}.tif")})
    arrays = {k: _read(v["OUTPUT"], None) for k, v in outs.items()}
    np.testing.assert_array_equal(arrays["named"], arrays["unnamed"])
    np.testing.assert_array_equal(arrays["named"], arrays["swapped"])


def test_cancel_leaves_no_output(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsProcessingException

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    feedback = Feedback.make(cancel_at=30.0)
    with pytest.raises(QgsProcessingException, match="cancelled"):
        _run("classify", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["classifier"]), "BATCH_SIZE": 16,
                          "OUTPUT_GRID": str(out_dir / "g.gpkg"), "OUTPUT_CLASSES": str(out_dir / "c.tif"),
                          "OUTPUT_PROBABILITY": str(out_dir / "p.tif")}, feedback)
    assert 30.0 <= feedback.progress[-1] < 100.0
    assert list(out_dir.iterdir()) == []


def test_embedder_cannot_classify(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="is an embedder"):
        _run("classify", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]),
                          "OUTPUT_GRID": str(tmp_path / "g.gpkg"), "OUTPUT_CLASSES": str(tmp_path / "c.tif"),
                          "OUTPUT_PROBABILITY": str(tmp_path / "p.tif")})


def test_enum_spellings_resolve_on_this_qgis(qgis_app: Any) -> None:
    from explora_geo_qgis.algorithms import compat
    from qgis.core import QgsProcessing, QgsProcessingParameterNumber, QgsUnitTypes

    assert compat.SOURCE_POLYGON == QgsProcessing.SourceType.TypeVectorPolygon
    assert compat.NUMBER_INTEGER == QgsProcessingParameterNumber.Type.Integer
    assert QgsUnitTypes.fromUnitToUnitFactor(compat.METERS, QgsUnitTypes.DistanceUnit.DistanceKilometers) == 0.001
    with pytest.raises(AttributeError, match="none of"):
        compat.pick((compat, "No.Such"))


def test_overlap_halves_the_cells_and_polygon_reference(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                         tmp_path: Path) -> None:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    extent = "330000,331280,5820760,5822040 [EPSG:32633]"  # 1280 m square
    out = _run("classify", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["classifier"]), "EXTENT": extent,
                            "OVERLAP": 50, "MIN_VALID": 0.5, "OUTPUT_GRID": str(tmp_path / "g.gpkg"),
                            "OUTPUT_CLASSES": str(tmp_path / "c.tif"), "OUTPUT_PROBABILITY": str(tmp_path / "p.tif")})
    ds = gdal.Open(out["OUTPUT_CLASSES"])
    # stride 16 px -> 160 m cells, 8 x 8 of them; edge tiles reach 8 px outside the processed area, which is
    # neither valid nor invalid (a tile is judged on its pixels inside the area)
    assert ds.GetGeoTransform() == (330000.0, 160.0, 0.0, 5822040.0, 0.0, -160.0)
    assert (ds.RasterXSize, ds.RasterYSize) == (8, 8)
    ds = None
    rows = _features(out["OUTPUT_GRID"])
    corner = next(r for r in rows if (r["tile_row"], r["tile_col"]) == (0, 0))
    assert corner["valid_frac"] == 1.0 and corner["status"] == "ok" and corner["class_id"] >= 0
    inner = next(r for r in rows if (r["tile_row"], r["tile_col"]) == (3, 3))
    assert inner["valid_frac"] == 1.0 and inner["status"] == "ok"
    polygon = QgsVectorLayer("Polygon?crs=EPSG:32633", "ref", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POLYGON((330000 5822040, 330300 5822040, 330300 5821740, "
                                             "330000 5821740, 330000 5822040))"))
    polygon.dataProvider().addFeatures([feature])
    sim = _run("similarity", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]), "EXTENT": extent,
                              "OVERLAP": 50, "REFERENCE": polygon, "OUTPUT": str(tmp_path / "s.tif")})
    assert sim["REFERENCE_TILES"] == 4  # the 300 m square touches 2 x 2 cells of 160 m
    values = _read(sim["OUTPUT"])
    assert values.shape == (8, 8) and np.all((values >= -1.0001) & (values <= 1.0001))


def test_float_raster_nan_pixels_are_nodata(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    """A float32 raster without a nodata value: NaN pixels are invalid all the same."""
    path = tmp_path / "float.tif"
    src = gdal.Open(str(t33uuu_vrt))
    ds = gdal.Translate(str(path), src, outputType=gdal.GDT_Float32, srcWin=[0, 0, 128, 64])
    for i in range(1, ds.RasterCount + 1):
        band = ds.GetRasterBand(i)
        values = band.ReadAsArray()
        values[:, :32] = np.nan  # first tile column
        if i == 4:
            values[:, 32:48] = np.nan  # half of the second column, in one band only
        band.WriteArray(values)
        band.SetDescription(src.GetRasterBand(i).GetDescription())
    ds = src = None
    out = _run("embed", {"INPUT": _layer(path, "float"), "MODEL": str(bundle["embedder"]), "MIN_VALID": 0.5,
                         "OUTPUT": str(tmp_path / "e.tif")})
    first = _read(out["OUTPUT"])
    assert first.shape == (2, 4)
    assert (first[:, 0] == -9999.0).all() and (first[:, 1:] != -9999.0).all()
    assert out["TILES_RUN"] == 6


def test_missing_onnxruntime_message_in_qgis(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from qgis.core import QgsProcessingException

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(QgsProcessingException, match=r"onnxruntime is missing.*pip install onnxruntime"):
        _run("embed", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]),
                       "OUTPUT": str(tmp_path / "e.tif")})


# ---- rasters analysts really load (issue 12) -------------------------------------------------------------
def _copy_scene(src_vrt: Path, path: Path, *, dtype: int, src_win: list[int], nodata: float | None = None,
                edit: Any = None) -> Path:
    """A GeoTIFF copy of a window of the real scene (band descriptions kept); ``edit(i, values)`` may change each
    band's values."""
    src = gdal.Open(str(src_vrt))
    ds = gdal.Translate(str(path), src, outputType=dtype, srcWin=src_win, creationOptions=["TILED=YES"])
    for i in range(1, ds.RasterCount + 1):
        band = ds.GetRasterBand(i)
        if nodata is not None:
            band.SetNoDataValue(nodata)
        if edit is not None:
            band.WriteArray(edit(i, band.ReadAsArray()))
        band.SetDescription(src.GetRasterBand(i).GetDescription())
    ds = src = None
    return path


def _classify(path: Path, bundle: dict, out: Path, name: str = "layer", feedback: Any = None, layer: Any = None,
              **params: Any) -> dict:
    out.mkdir(exist_ok=True)
    return _run("classify", {"INPUT": layer or _layer(path, name), "MODEL": str(bundle["classifier"]),
                             "OUTPUT_GRID": str(out / "g.gpkg"), "OUTPUT_CLASSES": str(out / "c.tif"),
                             "OUTPUT_PROBABILITY": str(out / "p.tif"), **params}, feedback)


def _nan_pattern(shape: tuple[int, int]) -> np.ndarray:
    """Invalid pixels scattered (3 %) and in blocks, deterministic."""
    invalid = np.random.default_rng(12).random(shape) < 0.03
    invalid[:40, :20] = True  # tile (0, 0) is mostly nodata
    invalid[70:90, 100:150] = True  # partial tiles
    invalid[:, -3:] = True  # a NaN edge, as exports have
    return invalid


def test_nan_float32_equals_uint16_with_nodata_zero(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                     tmp_path: Path) -> None:
    invalid = _nan_pattern((128, 256))
    win = [256, 128, 256, 128]
    as_uint16 = _copy_scene(t33uuu_vrt, tmp_path / "u16.tif", dtype=gdal.GDT_UInt16, src_win=win, nodata=0,
                            edit=lambda i, v: np.where(invalid, 0, v))
    as_float = _copy_scene(t33uuu_vrt, tmp_path / "f32.tif", dtype=gdal.GDT_Float32, src_win=win,
                           edit=lambda i, v: np.where(invalid, np.nan, v))
    feedback = Feedback.make()
    a = _classify(as_uint16, bundle, tmp_path / "a")
    b = _classify(as_float, bundle, tmp_path / "b", feedback=feedback)
    classes_a, classes_b = _read(a["OUTPUT_CLASSES"]), _read(b["OUTPUT_CLASSES"])
    np.testing.assert_array_equal(classes_a, classes_b)
    np.testing.assert_allclose(_read(a["OUTPUT_PROBABILITY"]), _read(b["OUTPUT_PROBABILITY"]), atol=1e-6)
    rows = {(r["tile_row"], r["tile_col"]): r for r in _features(b["OUTPUT_GRID"])}
    assert rows[(0, 0)]["status"] == "nodata" and classes_b[0, 0] == 255  # below MIN_VALID: nodata
    partial = [r for r in rows.values() if r["status"] == "partial"]
    assert len(partial) == b["TILES_PARTIAL"] == b["TILES_RUN"]  # every processed tile has some NaN
    assert all(r["class_id"] >= 0 and r["probability"] is not None for r in partial)
    # skipped: tile (0, 0) and tile (2, 3), 55 % of which the block covers
    assert b["TILES_RUN"] + b["TILES_SKIPPED"] == 8 * 4 and b["TILES_SKIPPED"] == 2 and classes_b[2, 3] == 255
    # the embeddings (more telling than this tiny model's saturated probabilities) agree as well
    emb = [_read(_run("embed", {"INPUT": _layer(p), "MODEL": str(bundle["embedder"]),
                                "OUTPUT": str(tmp_path / f"e{k}.tif")})["OUTPUT"], None) for k, p in
           enumerate((as_uint16, as_float))]
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-5)
    ran = classes_b != 255
    assert np.isfinite(emb[1]).all() and (emb[1][:, ~ran] == -9999.0).all()
    assert np.ptp(emb[1][:, ran], axis=1).min() > 0  # real, differing tiles
    assert any(f"{b['TILES_PARTIAL']} partial" in m for m in feedback.infos)


@pytest.mark.parametrize("case", ["smaller_than_a_tile", "all_nan", "tiny_extent"])
def test_no_processed_tile_writes_all_nodata(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path,
                                             case: str) -> None:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    extra: dict = {}
    if case == "smaller_than_a_tile":
        path = _copy_scene(t33uuu_vrt, tmp_path / "small.tif", dtype=gdal.GDT_UInt16, src_win=[0, 0, 20, 13])
    elif case == "all_nan":
        path = _copy_scene(t33uuu_vrt, tmp_path / "nan.tif", dtype=gdal.GDT_Float32, src_win=[0, 0, 100, 70],
                           edit=lambda i, v: np.full_like(v, np.nan))
    else:
        path = t33uuu_vrt
        extra = {"EXTENT": "330000,330050,5821990,5822040 [EPSG:32633]"}  # 5 x 5 px
    point = QgsVectorLayer("Point?crs=EPSG:32633", "ref", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POINT(330010 5822030)"))
    point.dataProvider().addFeatures([feature])
    feedback = Feedback.make()
    out = _classify(path, bundle, tmp_path / "c", feedback=feedback, **extra)
    assert out["TILES_RUN"] == 0
    assert (_read(out["OUTPUT_CLASSES"]) == 255).all() and (_read(out["OUTPUT_PROBABILITY"]) == -9999.0).all()
    assert all(r["status"] == "nodata" for r in _features(out["OUTPUT_GRID"]))
    (why,) = [m for m in feedback.infos if m.startswith("No tile was processed")]
    assert ("no valid pixel" in why) == (case == "all_nan")
    emb = _run("embed", {"INPUT": _layer(path), "MODEL": str(bundle["embedder"]), "OUTPUT": str(tmp_path / "e.tif"),
                         **extra})
    assert (_read(emb["OUTPUT"], None) == -9999.0).all()
    sim = _run("similarity", {"INPUT": _layer(path), "MODEL": str(bundle["embedder"]), "REFERENCE": point,
                              "OUTPUT": str(tmp_path / "s.tif"), **extra})
    assert (_read(sim["OUTPUT"]) == -9999.0).all() and sim["REFERENCE_TILES"] == 0


def _to_wgs84(src: Path, path: Path, width: int, height: int, bounds: tuple[float, ...]) -> Path:
    """The scene warped to EPSG:4326 with an exact pixel size (odd sizes on purpose), band names kept."""
    warped = gdal.Warp(str(path), str(src), options=gdal.WarpOptions(
        format="GTiff", dstSRS="EPSG:4326", outputBounds=bounds, outputBoundsSRS="EPSG:4326", width=width,
        height=height, resampleAlg="near", outputType=gdal.GDT_Float32, dstNodata=float("nan")))
    del warped  # closes the file
    source = gdal.Open(str(src))
    ds = gdal.Open(str(path), gdal.GA_Update)
    for i in range(1, ds.RasterCount + 1):
        ds.GetRasterBand(i).SetDescription(source.GetRasterBand(i).GetDescription())
    ds = source = None
    return path


@pytest.mark.parametrize("size", [(61, 27, 0.0003, 0.0002), (35, 71, 0.0003, 0.0002), (333, 201, 0.00021, 0.000129)])
def test_epsg4326_layers_of_odd_sizes(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path,
                                      size: tuple[int, int, float, float]) -> None:
    """Degree layers of odd sizes. The first two give a working grid of 32 k + 1 rows whose last 1-px strip the
    projector returns as an empty block (checked here): those pixels are invalid, not an error."""
    from explora_geo_qgis.algorithms.raster_source import LayerReader

    width, height, xres, yres = size
    bounds = (12.5523, 52.4603, 12.5523 + width * xres, 52.4603 + height * yres)
    path = _to_wgs84(t33uuu_vrt, tmp_path / "wgs84.tif", width, height, bounds)
    layer = _layer(path)
    feedback = Feedback.make()
    out = _classify(path, bundle, tmp_path / "c", feedback=feedback, layer=layer)
    assert any("working in EPSG:32633" in m for m in feedback.infos)
    ids = _read(out["OUTPUT_CLASSES"])
    rows = _features(out["OUTPUT_GRID"])
    assert len(rows) == ids.size and out["TILES_RUN"] == sum(r["status"] != "nodata" for r in rows) > 0
    assert all(ids[r["tile_row"], r["tile_col"]] == (255 if r["status"] == "nodata" else r["class_id"])
               for r in rows)
    assert feedback.progress[-1] == pytest.approx(100.0)
    if xres == 0.0003:
        from explora_geo_qgis.algorithms.raster_source import make_grid, working_crs
        from qgis.core import QgsCoordinateTransform, QgsProject

        crs = working_crs(layer, layer.extent())
        area = QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance()).transformBoundingBox(layer.extent())
        grid = make_grid(crs, area, 10.0)
        reader = LayerReader(layer, [2], grid)
        assert grid.height % 32 == 1 and ids.shape[0] == grid.height // 32 + 1
        empty = reader.source.block(2, grid.window_extent(grid.height - 1, grid.height, 0, grid.width), grid.width, 1)
        assert empty.isEmpty()  # the projector quirk this test is about
        data, valid = reader.read(grid.height - 1, grid.height, 0, grid.width)
        assert data.shape == (1, 1, grid.width) and not valid.any()


def test_reflectance_refused_then_right_with_scale(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                   tmp_path: Path) -> None:
    from qgis.core import QgsProcessingException

    win = [0, 0, 192, 128]
    dn = _copy_scene(t33uuu_vrt, tmp_path / "dn.tif", dtype=gdal.GDT_UInt16, src_win=win)
    refl = _copy_scene(t33uuu_vrt, tmp_path / "refl.tif", dtype=gdal.GDT_Float32, src_win=win,
                       edit=lambda i, v: v.astype(np.float32) / 10000)
    with pytest.raises(QgsProcessingException, match=r"layer 'refl' values are about \d+x smaller.*set SCALE=10000"):
        _classify(refl, bundle, tmp_path / "x", name="refl")
    assert not (tmp_path / "x" / "c.tif").exists()
    feedback = Feedback.make()
    fixed = _classify(refl, bundle, tmp_path / "fixed", name="refl", feedback=feedback, SCALE=10000)
    reference = _classify(dn, bundle, tmp_path / "ref")
    np.testing.assert_array_equal(_read(fixed["OUTPUT_CLASSES"]), _read(reference["OUTPUT_CLASSES"]))
    np.testing.assert_allclose(_read(fixed["OUTPUT_PROBABILITY"]), _read(reference["OUTPUT_PROBABILITY"]),
                               atol=1e-4)
    assert any(m.startswith("Value scale checked") for m in feedback.infos)


@pytest.mark.parametrize("dtype", [gdal.GDT_UInt16, gdal.GDT_Float32])
def test_layer_user_nodata_ranges(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path,
                                  dtype: int) -> None:
    """Pixels in a user no-data range set on the layer (Layer Properties > Transparency) are nodata, on integer
    and float layers, exactly as if the file had them as nodata."""
    from qgis.core import QgsRasterRange

    win = [512, 256, 192, 128]
    marked = np.zeros((128, 192), bool)
    marked[:, :40] = True  # tile columns 0 (all) and 1 (8 of 32 px)
    marked[100:, 150:] = True
    user = _copy_scene(t33uuu_vrt, tmp_path / "user.tif", dtype=dtype, src_win=win,
                       edit=lambda i, v: np.where(marked, 60000, v) if i == 3 else v)  # one band only
    layer = _layer(user, "user")
    layer.dataProvider().setUserNoDataValue(3, [QgsRasterRange(59000, 61000)])
    with_ranges = _classify(user, bundle, tmp_path / "a", layer=layer)
    as_nodata = _copy_scene(t33uuu_vrt, tmp_path / "nd.tif", dtype=gdal.GDT_UInt16, src_win=win, nodata=0,
                            edit=lambda i, v: np.where(marked, 0, v) if i == 3 else v)
    reference = _classify(as_nodata, bundle, tmp_path / "b")
    ids = _read(with_ranges["OUTPUT_CLASSES"])
    np.testing.assert_array_equal(ids, _read(reference["OUTPUT_CLASSES"]))
    skipped = np.zeros(ids.shape, bool)
    skipped[:, 0] = skipped[3, 5] = True  # all marked / 28 of 32 rows marked
    np.testing.assert_array_equal(ids == 255, skipped)
    rows = {(r["tile_row"], r["tile_col"]): r for r in _features(with_ranges["OUTPUT_GRID"])}
    assert rows[(0, 1)]["valid_frac"] == pytest.approx(24 / 32) and rows[(0, 1)]["status"] == "partial"
    assert rows[(3, 4)]["status"] == "partial" and rows[(2, 2)]["status"] == "ok"


def test_centred_similarity_spans_a_usable_range(qgis_app: Any, bundle: dict, t33uuu_vrt: Path,
                                                 tmp_path: Path) -> None:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    point = QgsVectorLayer("Point?crs=EPSG:32633", "ref", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POINT(335010 5818030)"))
    point.dataProvider().addFeatures([feature])
    spans = {}
    for mode in (0, 1):
        feedback = Feedback.make()
        out = _run("similarity", {"INPUT": _layer(t33uuu_vrt), "MODEL": str(bundle["embedder"]), "REFERENCE": point,
                                  "MODE": mode, "BATCH_SIZE": 64, "OUTPUT": str(tmp_path / f"s{mode}.tif")}, feedback)
        values = _read(out["OUTPUT"])
        assert (values != -9999.0).all() and values.max() == pytest.approx(1.0, abs=1e-4)
        spans[mode] = float(values.max() - values.min())
        assert any("similarity spans" in m for m in feedback.infos)
    assert spans[0] > 1.0  # centred: from clearly unlike (< 0) to the reference itself (1)
    assert spans[0] > 5 * spans[1]  # raw cosine crowds the scene near 1


def test_reference_on_a_partly_nan_tile(qgis_app: Any, bundle: dict, t33uuu_vrt: Path, tmp_path: Path) -> None:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    invalid = _nan_pattern((128, 256))
    path = _copy_scene(t33uuu_vrt, tmp_path / "f32.tif", dtype=gdal.GDT_Float32, src_win=[256, 128, 256, 128],
                       edit=lambda i, v: np.where(invalid, np.nan, v))
    gt = gdal.Open(str(path)).GetGeoTransform()
    point = QgsVectorLayer("Point?crs=EPSG:32633", "ref", "memory")
    feature = QgsFeature()
    # cell (2, 4): rows 64..95 and columns 128..159, 43 % in the NaN block (plus scattered NaN)
    feature.setGeometry(QgsGeometry.fromWkt(f"POINT({gt[0] + 140 * gt[1]} {gt[3] + 80 * gt[5]})"))
    point.dataProvider().addFeatures([feature])
    out = _run("similarity", {"INPUT": _layer(path), "MODEL": str(bundle["embedder"]), "REFERENCE": point,
                              "OUTPUT": str(tmp_path / "s.tif")})
    values = _read(out["OUTPUT"])
    assert out["REFERENCE_TILES"] == 1 and values[2, 4] == pytest.approx(1.0, abs=1e-5)

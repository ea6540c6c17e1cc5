"""The plugin's inference core (numpy + onnxruntime + osgeo; no qgis)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from explora_geo_qgis.core.bands import canonical_band_name, layer_band_label, parse_mapping, resolve_bands
from explora_geo_qgis.core.errors import PluginError
from explora_geo_qgis.core.model import ModelInfo, OnnxModel, import_onnxruntime
from explora_geo_qgis.core.outputs import write_classification, write_embedding, write_float_map
from explora_geo_qgis.core.pipeline import Cancelled, RunSettings, infer, run_tiles
from explora_geo_qgis.core.products import (
    STATUS_NODATA,
    attribute_columns,
    classify,
    cosine_similarity,
    reference_embedding,
    similarity_map,
)
from explora_geo_qgis.core.reader import ArrayReader, NodataRange, NodataRule, sample_valid_pixels
from explora_geo_qgis.core.scaling import Scaler, check_value_scale
from explora_geo_qgis.core.tiling import TileGrid, fill_invalid, tile_views, valid_fractions
from explora_geo_qgis.core.writers import write_geotiff, write_tile_grid
from osgeo import gdal

PLUGIN_ROOT = Path(__file__).resolve().parents[2] / "qgis_plugin"

S2 = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]


# ---- bands ------------------------------------------------------------------------------------------
def test_canonical_band_names() -> None:
    assert [canonical_band_name(n) for n in ("b2", "B02", "band_2", " B8a", "nir")] == ["B02", "B02", "B02",
                                                                                       "B8A", "NIR"]
    assert layer_band_label("Band 02: B02") == "B02"
    assert layer_band_label("Band 2") == ""


def test_resolve_by_name_reorders() -> None:
    layer = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
    assert resolve_bands(S2, layer) == [2, 3, 4, 8, 5, 6, 7, 13, 11, 12]


def test_resolve_by_position_only_when_unnamed_and_same_count() -> None:
    assert resolve_bands(S2, [""] * 10) == list(range(1, 11))
    with pytest.raises(PluginError, match="lacks band"):
        resolve_bands(S2, [""] * 12)


def test_missing_bands_are_named() -> None:
    with pytest.raises(PluginError) as err:
        resolve_bands(S2, ["B02", "B03", "B04"], source="layer 'rgb'")
    msg = str(err.value)
    assert "layer 'rgb' lacks band(s) B08, B05, B06, B07, B8A, B11, B12" in msg and "\n" not in msg


def test_mapping_override() -> None:
    mapping = parse_mapping("b8=1; B02 = 4", S2)
    assert mapping == {"B08": 1, "B02": 4}
    layer = ["B02", "B03", "B04", "x", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert resolve_bands(S2, layer, {"B08": 4}) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    with pytest.raises(PluginError, match="out of range"):
        resolve_bands(S2, layer, {"B08": 11})
    with pytest.raises(PluginError, match="MODEL_BAND=LAYER_BAND_NUMBER"):
        parse_mapping("B99=1", S2)


# ---- scaling ----------------------------------------------------------------------------------------
def test_scaler_formulas() -> None:
    x = np.array([[[0.0, 500.0]], [[3000.0, 10000.0]]], dtype=np.uint16)  # [2, 1, 2]
    refl = Scaler.from_dict({"scheme": "reflectance", "bands": ["a", "b"], "offset": [0, 1000], "divide": 10000})
    np.testing.assert_allclose(refl(x), [[[0.0, 0.05]], [[0.2, 0.9]]], rtol=1e-6)
    sat = Scaler.from_dict({"scheme": "satmae", "bands": ["a", "b"], "mean": [1000, 5000], "std": [250, 1000]})
    # a: range [500, 1500]; b: range [3000, 7000]
    np.testing.assert_allclose(sat(x), [[[0.0, 0.0]], [[0.0, 1.0]]], atol=1e-6)
    ms = Scaler.from_dict({"scheme": "meanstd", "bands": ["a", "b"], "mean": [100, 5000], "std": [50, 1000]})
    np.testing.assert_allclose(ms(x), [[[-2.0, 8.0]], [[-2.0, 5.0]]], rtol=1e-6)
    with pytest.raises(PluginError, match="unknown normalisation scheme"):
        Scaler.from_dict({"scheme": "zscore", "bands": ["a"]})



def test_satmae_scaling_interior_values_and_strided_input() -> None:
    """Inside the clip range satmae maps linearly; strided uint16 tile views come out C-contiguous float32."""
    sat = Scaler.from_dict({"scheme": "satmae", "bands": ["a", "b"], "mean": [1000, 5000], "std": [250, 1000],
                            "offset": [100, 0]})
    strip = np.zeros((2, 4, 12), dtype=np.uint16)  # [C, T, W]: 3 tiles of 4 px
    strip[0] = np.arange(48).reshape(4, 12) * 40 + 300  # a: 300..2180 minus offset 100 -> 200..2080
    strip[1] = np.arange(48).reshape(4, 12) * 200 + 2000  # b: 2000..11400
    views = tile_views(strip, 4, 4, 3)  # [3, 2, 4, 4], not contiguous
    y = sat(views)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == (3, 2, 4, 4)
    x = np.ascontiguousarray(views).astype(np.float64)
    low, high = np.array([500.0, 3000.0])[:, None, None], np.array([1500.0, 7000.0])[:, None, None]
    offset = np.array([100.0, 0.0])[:, None, None]
    expected = (np.clip(x - offset, low, high) - low) / (high - low)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    assert (y == 0).any() and (y == 1).any()  # both clip ends reached
    assert ((y > 0) & (y < 1)).sum() > 10  # interior values were checked, not only the clipped ends

# ---- tiling -----------------------------------------------------------------------------------------
def test_grid_cells_cover_raster() -> None:
    grid = TileGrid.from_overlap(100, 70, 32, 0.5)
    assert (grid.stride, grid.margin, grid.n_cols, grid.n_rows) == (16, 8, 7, 5)
    assert grid.strip_window(1) == (8, 40, -8, 120)
    assert grid.cell_geotransform((1000.0, 10.0, 0.0, 5000.0, 0.0, -10.0)) == (1000.0, 160.0, 0.0, 5000.0, 0.0,
                                                                                -160.0)
    with pytest.raises(PluginError, match="stride"):
        TileGrid(10, 10, 8, 9)


def test_tile_views_and_fractions() -> None:
    strip = np.arange(2 * 4 * 10).reshape(2, 4, 10)
    tiles = tile_views(strip, 4, 3, 3)
    assert tiles.shape == (3, 2, 4, 4)
    np.testing.assert_array_equal(tiles[2], strip[:, :, 6:10])
    valid = np.ones((4, 10), bool)
    valid[:, :2] = False
    np.testing.assert_allclose(valid_fractions(valid, 4, 3, 3), [0.5, 1.0, 1.0])


def test_edge_tile_valid_fraction_counts_only_in_raster_pixels() -> None:
    """An edge tile is judged on its pixels inside the raster: the part beyond is neither valid nor invalid,
    nodata inside the raster still counts as invalid; a raster smaller than a tile keeps the whole-tile rule."""
    grid = TileGrid(20, 18, 8, 4)  # stride 4, margin 2: 5 x 5 tiles, edge ones reach 2..6 px beyond
    assert grid.holds_a_tile and not TileGrid(20, 7, 8, 4).holds_a_tile
    # tile row 0 covers raster rows -2..5 (6 inside); columns: -2..5, 2..9, ..., 14..21 (6, 8, 8, 8, 6 inside)
    np.testing.assert_array_equal(grid.inside_counts(0), [36, 48, 48, 48, 36])
    # tile row 4 covers rows 14..21: 4 of 8 inside (the raster is 18 high)
    np.testing.assert_array_equal(grid.inside_counts(4), [24, 32, 32, 32, 24])
    r0, r1, c0, c1 = grid.strip_window(4)
    raster_valid = np.ones((18, 20), bool)
    raster_valid[16, 0] = raster_valid[17, 0] = False  # 2 nodata pixels inside the corner tile
    strip = np.zeros((r1 - r0, c1 - c0), bool)  # beyond the raster: False, as read_strip pads it
    strip[:18 - r0, -c0:-c0 + 20] = raster_valid[r0:]
    fractions = valid_fractions(strip, 8, 4, grid.n_cols, inside=grid.inside_counts(4))
    np.testing.assert_allclose(fractions, [22 / 24, 1.0, 1.0, 1.0, 1.0])
    # the whole-tile rule (outside counted as invalid) would put the corner at 22 / 64, below MIN_VALID 0.5
    np.testing.assert_allclose(valid_fractions(strip, 8, 4, grid.n_cols)[[0, 4]], [22 / 64, 24 / 64])


def test_fill_invalid_uses_tile_band_means() -> None:
    tiles = np.array([[[[1.0, 3.0], [5.0, 100.0]]]], dtype=np.float32)
    valid = np.array([[[True, True], [True, False]]])
    fill_invalid(tiles, valid)
    assert tiles[0, 0, 1, 1] == pytest.approx(3.0)


# ---- pipeline (with a numpy model whose embedding is the per-band mean of the tile) -------------------
class MeanModel:
    """A model computed in numpy: embedding = per-band mean of each scaled tile (exact, checkable)."""

    def __init__(self, tile: int, bands: list[str]) -> None:
        scaler = Scaler.from_dict({"scheme": "reflectance", "bands": bands, "divide": 1.0})
        self.info = ModelInfo("embedder", tuple(bands), tile, 10.0, len(bands), (), (), scaler, {})
        self.batches: list[int] = []

    def output_shape(self, name: str) -> tuple[int, ...]:
        return self.info.output_shape(name)

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = ("embedding",)) -> dict[str, np.ndarray]:
        assert np.isfinite(batch).all(), "NaN or inf reached the model"
        self.batches.append(len(batch))
        return {"embedding": batch.mean(axis=(2, 3))}


def _reader(image: np.ndarray, valid: np.ndarray):
    calls = []

    def read(r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((r0, r1, c0, c1))
        return image[:, r0:r1, c0:c1], valid[r0:r1, c0:c1]

    read.calls = calls
    return read


def test_pipeline_stitches_every_tile_in_place() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, size=(2, 40, 56)).astype(np.uint16)
    valid = np.ones((40, 56), bool)
    valid[:, :8] = False  # first tile column is nodata
    model = MeanModel(8, ["a", "b"])
    grid = TileGrid(56, 40, 8, 8)
    result = run_tiles(_reader(image, valid), grid, model, batch_size=6, min_valid=0.5)
    assert result.tiles_run == 5 * 6 and model.batches == [6] * 5
    emb = result.outputs["embedding"]
    assert np.isnan(emb[:, 0]).all() and not result.ran[:, 0].any()
    for r in range(5):
        for c in range(1, 7):
            np.testing.assert_allclose(emb[r, c], image[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].mean(axis=(1, 2)),
                                       rtol=1e-5)
    np.testing.assert_allclose(result.valid_fraction[:, 0], 0.0)


@pytest.mark.parametrize("overlap_px", [0, 4])
def test_pipeline_row_bands_equal_the_whole_run(overlap_px: int) -> None:
    """``rows=(r0, r1)`` runs a band of tile rows (a part of a large raster): the same tiles, read, filled and
    scaled as in the whole run (reads reach beyond the band for overlapping tiles), with ``row0`` set."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 1000, size=(2, 44, 40)).astype(np.uint16)
    valid = rng.random((44, 40)) > 0.2
    grid = TileGrid(40, 44, 8, 8 - overlap_px)
    whole = run_tiles(_reader(image, valid), grid, MeanModel(8, ["a", "b"]), batch_size=5, min_valid=0.5)
    bands = [run_tiles(_reader(image, valid), grid, MeanModel(8, ["a", "b"]), batch_size=5, min_valid=0.5,
                       rows=rows) for rows in grid.row_bands(2)]
    assert [b.row0 for b in bands] == list(range(0, grid.n_rows, 2)) and len(bands) > 2
    np.testing.assert_array_equal(np.concatenate([b.outputs["embedding"] for b in bands]),
                                  whole.outputs["embedding"])
    np.testing.assert_array_equal(np.concatenate([b.valid_fraction for b in bands]), whole.valid_fraction)
    assert sum(b.tiles_run for b in bands) == whole.tiles_run > 0
    with pytest.raises(PluginError, match="are not rows of"):
        run_tiles(_reader(image, valid), grid, MeanModel(8, ["a", "b"]), rows=(2, grid.n_rows + 1))


def test_segmentation_writer_and_cloud_optimized_geotiffs(tmp_path: Path) -> None:
    """``write_segmentation`` (the one writer of the plugin's ``segment`` and ``predict``): class raster with
    names and colours, probability raster; with ``cog=True`` both are Cloud-Optimized GeoTIFFs (COG layout,
    512 px tiles, overviews, classes overviewed to class ids), the same pixels, georeferencing and metadata."""
    from explora_geo_qgis.core.blending import LogitBlender
    from explora_geo_qgis.core.outputs import write_segmentation

    grid = TileGrid(1200, 700, 16, 16)
    rng = np.random.default_rng(0)
    blender = LogitBlender(grid, 3)
    for r in range(grid.n_rows):
        blender.add(np.full(grid.n_cols, r), np.arange(grid.n_cols),
                    rng.normal(size=(grid.n_cols, 3, 16, 16)).astype(np.float32))
    blender.finish()
    blender.class_id[:5] = 255  # some nodata
    info = ModelInfo("segmenter", ("a",), 16, 10.0, 4, ("water", "land", "cloud"), ("#0000ff", "#00ff00", "#ffffff"),
                     Scaler.from_dict({"scheme": "none", "bands": ["a"]}), {})
    gt, wkt = (330000.0, 10.0, 0.0, 5822040.0, 0.0, -10.0), _utm_wkt()
    files = {}
    for cog in (False, True):
        files[cog] = (tmp_path / f"s{cog}.tif", tmp_path / f"p{cog}.tif")
        write_segmentation(blender, info, gt, wkt, class_path=files[cog][0], prob_path=files[cog][1], cog=cog)
    for k, path in enumerate(files[True]):
        plain = gdal.Open(str(files[False][k]))
        ds = gdal.Open(str(path))
        band = ds.GetRasterBand(1)
        assert band.GetDescription() == ["class", "probability"][k]  # (also loads GDAL's side file)
        assert ds.GetMetadata("IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert plain.GetMetadata("IMAGE_STRUCTURE").get("LAYOUT") != "COG"
        assert band.GetBlockSize() == [512, 512] and band.GetOverviewCount() >= 1
        np.testing.assert_array_equal(ds.ReadAsArray(), plain.ReadAsArray())
        np.testing.assert_array_equal(ds.ReadAsArray(), [blender.class_id, blender.probability][k])
        assert ds.GetGeoTransform() == gt and band.GetNoDataValue() == [255, -9999][k]
        if k == 0:
            assert band.GetCategoryNames() == ["water", "land", "cloud"]
            assert [band.GetColorTable().GetColorEntry(i)[:3] for i in range(3)] == [(0, 0, 255), (0, 255, 0),
                                                                                    (255, 255, 255)]
            overview = band.GetOverview(0).ReadAsArray()
            assert set(np.unique(overview)) <= {0, 1, 2, 255} and overview.shape == (350, 600)
        ds = plain = None
    names = {p.name for p in tmp_path.iterdir()}  # no temporary left behind
    assert {f"{s}{c}.tif" for s in "sp" for c in (False, True)} <= names and not any(n.startswith(".") for n in names)


def test_pipeline_overlap_judges_edge_tiles_inside_and_fills_beyond() -> None:
    image = np.full((1, 20, 20), 7, dtype=np.uint16)
    image[0, :2, :2] = 1  # a corner block, inside the corner tile only
    valid = np.ones((20, 20), bool)
    valid[19, 19] = False  # nodata inside the raster still counts as invalid
    model = MeanModel(8, ["a"])
    grid = TileGrid.from_overlap(20, 20, 8, 0.5)  # stride 4, margin 2 -> 5 x 5 cells
    # corner tiles have only 6 x 6 of their 8 x 8 pixels inside the raster: judged on those, they pass 0.95
    result = run_tiles(_reader(image, valid), grid, model, batch_size=4, min_valid=0.95)
    assert result.ran.all()
    assert result.valid_fraction[0, 0] == 1.0 and result.valid_fraction[4, 4] == pytest.approx(35 / 36)
    assert result.tiles_partial == 1 and result.partial[4, 4]
    # the part beyond the raster is filled with the tile's valid mean: the corner embedding is the in-raster
    # mean (4 px of 1 and 32 px of 7 of 36), not diluted by the padding
    assert result.outputs["embedding"][0, 0, 0] == pytest.approx((4 * 1 + 32 * 7) / 36)
    np.testing.assert_allclose(result.outputs["embedding"][1:, 1:], 7.0)


def test_pipeline_cancel_stops_and_reports() -> None:
    image = np.zeros((1, 64, 64), dtype=np.uint16)
    model = MeanModel(8, ["a"])
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        run_tiles(_reader(image, np.ones((64, 64), bool)), TileGrid(64, 64, 8, 8), model, batch_size=8,
                  is_cancelled=cancelled)
    assert sum(model.batches) < 64


def test_pipeline_reader_errors_propagate() -> None:
    def broken(*_: int) -> tuple[np.ndarray, np.ndarray]:
        raise PluginError("band 3 could not be read")

    with pytest.raises(PluginError, match="band 3"):
        run_tiles(broken, TileGrid(16, 16, 8, 8), MeanModel(8, ["a"]))


# ---- products ---------------------------------------------------------------------------------------
def test_classify_and_columns() -> None:
    probs = np.array([[[0.1, 0.9], [0.6, 0.4]]], dtype=np.float32)
    ran = np.array([[True, False]])
    frac = np.array([[0.9, 0.1]], dtype=np.float32)
    result = classify(np.where(ran[..., None], probs, np.nan), ran, frac)
    assert result.class_id.tolist() == [[1, 255]]
    assert result.status.tolist() == [["partial", STATUS_NODATA]]
    cols = attribute_columns(result, ["bare soil", "water"], frac)
    assert cols["class_id"].tolist() == [[1, -1]] and cols["class_name"].tolist() == [["water", ""]]
    assert {"p_bare_soil", "p_water", "valid_frac", "status"} <= set(cols)
    assert np.isnan(cols["probability"][0, 1])


def test_similarity() -> None:
    emb = np.array([[[1.0, 0.0], [0.0, 2.0], [np.nan, np.nan]]], dtype=np.float32)
    ref = reference_embedding(emb, np.array([[True, False, True]]))
    np.testing.assert_allclose(cosine_similarity(emb, ref)[0, :2], [1.0, 0.0], atol=1e-6)
    with pytest.raises(PluginError, match="reference"):
        reference_embedding(emb, np.array([[False, False, True]]))


# ---- writers ----------------------------------------------------------------------------------------
def test_geotiff_and_grid_writers(tmp_path: Path) -> None:
    from osgeo import gdal, ogr, osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    wkt = srs.ExportToWkt()
    gt = (330000.0, 320.0, 0.0, 5822040.0, 0.0, -320.0)
    ids = np.array([[0, 1, 255]], dtype=np.uint8)
    path = write_geotiff(tmp_path / "c.tif", ids[None], gt, wkt, nodata=255, class_names=["a", "b"],
                         class_colors=["#ff0000", "#00ff00"])
    ds = gdal.Open(str(path))
    band = ds.GetRasterBand(1)
    assert ds.GetGeoTransform() == gt and band.GetNoDataValue() == 255
    assert band.GetCategoryNames() == ["a", "b"] and band.GetColorTable().GetColorEntry(1)[:3] == (0, 255, 0)
    ds = None
    cols = {"class_id": np.array([[0, 1, -1]]), "p": np.array([[0.5, 0.25, np.nan]]),
            "name": np.array([["a", "b", ""]], dtype=object)}
    write_tile_grid(tmp_path / "g.gpkg", gt, wkt, cols)
    source = ogr.Open(str(tmp_path / "g.gpkg"))  # keep the data source alive while its layer is used
    feats = list(source.GetLayer(0))
    assert len(feats) == 3 and feats[1]["class_id"] == 1 and feats[1]["name"] == "b" and feats[2]["p"] is None
    assert feats[0].GetGeometryRef().GetEnvelope() == (330000.0, 330320.0, 5821720.0, 5822040.0)
    source = None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "c.tif.aux.xml", "g.gpkg"]


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_geotiff(tmp_path / "bad.tif", np.zeros((1, 2, 2), np.float64), (0, 1, 0, 0, 0, -1), "")
    assert list(tmp_path.iterdir()) == []


# ---- the ONNX model exported by explora-geo -------------------------------------------------------------
def test_exported_model_metadata_and_outputs(bundle: dict[str, Path]) -> None:
    model = OnnxModel(bundle["classifier"])
    info = model.info
    assert info.is_classifier and info.bands == tuple(S2) and info.tile_size == 32 and info.gsd_m == 10.0
    assert info.class_names == ("water", "vegetation", "built-up") and info.raw["resolution"] == 1000.0
    assert model.execution_provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    x = np.random.default_rng(0).random((5, 10, 32, 32), dtype=np.float32)
    out = model.run(x)
    assert out["embedding"].shape == (5, 64) and out["probabilities"].shape == (5, 3)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert not OnnxModel(bundle["embedder"]).info.is_classifier


def test_model_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="does not exist"):
        OnnxModel(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(PluginError, match="cannot be loaded"):
        OnnxModel(bad)


def test_missing_onnxruntime_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(PluginError, match="pip install onnxruntime"):
        import_onnxruntime()


def test_core_imports_no_qgis() -> None:
    modules = sorted(p.stem for p in (PLUGIN_ROOT / "explora_geo_qgis" / "core").glob("*.py"))
    assert {"reader", "pipeline", "outputs", "scaling"} <= set(modules)
    code = ("import sys; " + "; ".join(f"import explora_geo_qgis.core.{m}" for m in modules)
            + "; assert not any(m.split('.')[0] == 'qgis' for m in sys.modules), 'qgis imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PLUGIN_ROOT)  # noqa: S603


def test_many_classes_use_int16_ids() -> None:
    probs = np.full((1, 2, 300), 1 / 300, dtype=np.float32)
    probs[0, 0, 299] = 0.5
    result = classify(probs, np.array([[True, False]]), np.ones((1, 2), np.float32))
    assert result.class_id.dtype == np.int16 and result.class_id.tolist() == [[299, -1]]
    assert result.nodata_id == -1


# ---- no-data rules, NaN fill, no processed tile ---------------------------------------------------------
def test_nodata_rule_values_ranges_and_nan() -> None:
    floats = np.array([[np.nan, 1.0, 100.0, 150.0, 200.0, np.inf, -9999.0]], dtype=np.float32)
    rule = NodataRule((-9999.0,), (NodataRange(100.0, 200.0, include_min=True, include_max=False),))
    assert rule.apply(floats, np.ones(floats.shape, bool)).tolist() == [[False, True, False, False, True, False,
                                                                          False]]
    ints = np.array([[0, 5, 100, 150, 200, 65535]], dtype=np.uint16)
    open_low = NodataRule((0.0, -9999.0), (NodataRange(float("nan"), 100.0),))  # -9999 cannot be a uint16
    assert open_low.apply(ints, np.ones(ints.shape, bool)).tolist() == [[False, False, False, True, True, True]]
    assert NodataRule().with_value(7).values == (7.0,) and NodataRule().with_value(None) == NodataRule()


def test_fill_invalid_masks_nan_before_the_mean() -> None:
    """NaN * 0 is NaN: the fill must drop nodata pixels before weighting, whatever they hold."""
    tiles = np.array([[[[1.0, 3.0], [np.nan, np.inf]], [[2.0, 2.0], [-1e30, np.nan]]],
                      [[[4.0, 4.0], [4.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]]], dtype=np.float32)
    valid = np.array([[[True, True], [False, False]], [[True, True], [True, True]]])
    fill_invalid(tiles, valid)
    np.testing.assert_array_equal(tiles[0, 0], [[1.0, 3.0], [2.0, 2.0]])
    np.testing.assert_array_equal(tiles[0, 1], [[2.0, 2.0], [2.0, 2.0]])
    np.testing.assert_array_equal(tiles[1], np.array([[[4.0] * 2] * 2, [[5.0] * 2] * 2]))


def _scene(seed: int = 0, shape: tuple[int, int, int] = (2, 48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 4000, size=shape).astype(np.uint16)


def test_nan_float_equals_uint16_nodata_zero() -> None:
    """The same pixels as float32 with NaN (scattered and in blocks) and as uint16 with nodata=0 give the same
    outputs; partial tiles run (none has NaN output), tiles below the threshold are NaN everywhere."""
    image = _scene()
    invalid = np.zeros(image.shape[1:], bool)
    invalid[np.random.default_rng(1).random(invalid.shape) < 0.05] = True  # scattered
    invalid[0:16, 0:12] = True  # a block: tile (0, 0) is 25 % valid
    invalid[20:30, 40:60] = True
    as_uint16 = np.where(invalid, 0, image).astype(np.uint16)
    as_float = np.where(invalid, np.nan, image).astype(np.float32)
    grid = TileGrid(64, 48, 16, 16)
    runs = {}
    for name, data, rules in (("uint16", as_uint16, [NodataRule((0.0,))] * 2), ("float", as_float, [])):
        model = MeanModel(16, ["a", "b"])
        runs[name] = run_tiles(ArrayReader(data, rules=rules), grid, model, batch_size=5, min_valid=0.5)
    a, b = runs["uint16"], runs["float"]
    np.testing.assert_array_equal(a.ran, b.ran)
    np.testing.assert_array_equal(a.outputs["embedding"], b.outputs["embedding"])
    assert not a.ran[0, 0] and np.isnan(a.outputs["embedding"][0, 0]).all()
    expected_ran = a.valid_fraction >= 0.5
    np.testing.assert_array_equal(a.ran, expected_ran)
    assert a.tiles_run == expected_ran.sum() == 10 and a.tiles_skipped == 2 and a.tiles_partial == 10
    assert np.isfinite(a.outputs["embedding"][a.ran]).all()
    # the fill is the valid mean: a partial tile's embedding is the mean of its valid pixels
    tile = (slice(None), slice(16, 32), slice(32, 48))
    valid = ~invalid[tile[1:]]
    np.testing.assert_allclose(a.outputs["embedding"][1, 2], image[tile][:, valid].mean(axis=1), rtol=1e-5)


def _run_infer(data: np.ndarray, rules=(), tile: int = 16, **settings) -> tuple:
    model = MeanModel(tile, ["a", "b"][:data.shape[0]])
    reader = ArrayReader(data, rules=rules, geotransform=(500000.0, 10.0, 0.0, 5800000.0, 0.0, -10.0),
                         crs_wkt=_utm_wkt())
    return infer(reader, model, RunSettings(check_scale=False, **settings)), model


def _utm_wkt() -> str:
    from osgeo import osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    return srs.ExportToWkt()


@pytest.mark.parametrize("case", ["smaller_than_a_tile", "all_nan"])
def test_no_processed_tile_gives_all_nodata_outputs(case: str, tmp_path: Path) -> None:
    from osgeo import gdal

    data = _scene(shape=(2, 7, 5)) if case == "smaller_than_a_tile" else np.full((2, 40, 40), np.nan, np.float32)
    result, model = _run_infer(data)
    assert result.tiles_run == 0 and model.batches == []
    assert result.outputs["embedding"].shape == (*result.ran.shape, 2)
    assert np.isnan(result.outputs["embedding"]).all()
    (note,) = result.notes
    assert note.startswith("No tile was processed: ") and "\n" not in note
    assert ("smaller than one 16 px tile" in note) == (case == "smaller_than_a_tile")
    assert ("no valid pixel" in note) == (case == "all_nan")
    path = write_embedding(result, tmp_path / "e.tif")
    ds = gdal.Open(str(path))
    values = ds.ReadAsArray()
    assert ds.RasterCount == 2 and (values == -9999.0).all() and ds.GetRasterBand(1).GetNoDataValue() == -9999.0
    ds = None
    write_float_map(result, np.full(result.ran.shape, np.nan), tmp_path / "s.tif", "similarity")
    assert (gdal.Open(str(tmp_path / "s.tif")).ReadAsArray() == -9999.0).all()


def test_no_processed_tile_classification_files(bundle: dict[str, Path], tmp_path: Path) -> None:
    from osgeo import gdal, ogr

    model = OnnxModel(bundle["classifier"])
    data = np.full((10, 20, 20), np.nan, np.float32)
    reader = ArrayReader(data, geotransform=(500000.0, 10.0, 0.0, 5800000.0, 0.0, -10.0), crs_wkt=_utm_wkt())
    result = infer(reader, model, RunSettings(), outputs=("probabilities",))
    assert result.tiles_run == 0 and result.notes[0].startswith("Value scale not checked: no valid pixel")
    classes = write_classification(result, model.info, grid_path=tmp_path / "g.gpkg", class_path=tmp_path / "c.tif",
                                   prob_path=tmp_path / "p.tif")
    assert (classes.class_id == 255).all()
    assert (gdal.Open(str(tmp_path / "c.tif")).ReadAsArray() == 255).all()
    source = ogr.Open(str(tmp_path / "g.gpkg"))
    (feature,) = list(source.GetLayer(0))
    assert feature["status"] == "nodata" and feature["class_id"] == -1 and feature["probability"] is None
    source = None


def test_sample_valid_pixels_spreads_and_skips_nodata() -> None:
    data = np.zeros((1, 300, 400), np.float32)
    data[0] = np.arange(400)[None, :]
    data[0, :, :100] = np.nan
    sample = sample_valid_pixels(ArrayReader(data), windows=3, size=32)
    assert sample.shape[0] == 1 and np.isfinite(sample).all()
    assert sample.min() >= 100 and sample.max() > 350  # windows reach the right edge


# ---- value scale and SCALE/OFFSET -------------------------------------------------------------------------
SATMAE = {"scheme": "satmae", "bands": ["a", "b"], "mean": [1200.0, 2500.0], "std": [400.0, 900.0]}


@pytest.mark.parametrize("norm", [SATMAE, {"scheme": "meanstd", "bands": ["a", "b"], "mean": [1200, 2500],
                                           "std": [400, 900], "offset": [1000, 1000]},
                                  {"scheme": "reflectance", "bands": ["a", "b"], "divide": 10000,
                                   "offset": [1000, 1000]}])
def test_input_transform_is_folded_into_the_scaling(norm: dict) -> None:
    scaler = Scaler.from_dict(norm)
    x = np.random.default_rng(0).random((3, 2, 4, 4)).astype(np.float32)  # 0-1 reflectance
    expected = scaler((x.astype(np.float64) * 10000 + 1000).astype(np.float32))
    np.testing.assert_allclose(scaler.with_input(10000, 1000)(x), expected, atol=2e-4)
    assert scaler.with_input() is scaler
    with pytest.raises(PluginError, match="SCALE must be a positive"):
        scaler.with_input(0.0)


def test_value_scale_check_refuses_reflectance_for_a_dn_model() -> None:
    scaler = Scaler.from_dict(SATMAE)
    dn = np.random.default_rng(0).normal([[1200.0], [2500.0]], 300.0, size=(2, 500))
    assert check_value_scale(dn, scaler).startswith("Value scale checked")
    with pytest.raises(PluginError) as err:
        check_value_scale(dn / 10000, scaler, source="layer 'refl'")
    message = str(err.value)
    assert message.startswith("layer 'refl' values are about") and "set SCALE=10000 (value*SCALE+OFFSET)" in message
    assert "0-1 reflectance" in message and "\n" not in message
    assert check_value_scale(dn / 10000, scaler, scale=10000).startswith("Value scale checked")
    with pytest.raises(PluginError, match="SCALE=100 "):
        check_value_scale(dn / 100, scaler)  # percent
    with pytest.raises(PluginError, match="larger than the model expects.*SCALE=0.0001"):
        check_value_scale(dn, Scaler.from_dict({"scheme": "meanstd", "bands": ["a", "b"], "mean": [0.12, 0.25],
                                                "std": [0.04, 0.09]}))
    offset = Scaler.from_dict({**SATMAE, "offset": [1000.0, 1000.0]})
    with pytest.raises(PluginError, match="SCALE=10000 and OFFSET=1000"):
        check_value_scale(dn / 10000, offset)
    none = Scaler.from_dict({"scheme": "none", "bands": ["a", "b"]})
    assert check_value_scale(dn / 10000, none).startswith("Value scale not checked")


def test_infer_checks_the_scale_and_applies_scale(bundle: dict[str, Path]) -> None:
    model = OnnxModel(bundle["embedder"])
    rng = np.random.default_rng(0)
    dn = rng.integers(800, 3000, size=(10, 64, 64)).astype(np.uint16)
    reflectance = (dn / 10000).astype(np.float32)
    gt = (500000.0, 10.0, 0.0, 5800000.0, 0.0, -10.0)
    with pytest.raises(PluginError, match="SCALE=10000"):
        infer(ArrayReader(reflectance, geotransform=gt), model)
    fixed = infer(ArrayReader(reflectance, geotransform=gt), model, RunSettings(scale=10000))
    reference = infer(ArrayReader(dn, geotransform=gt), model)
    assert fixed.notes[0].startswith("Value scale checked") and fixed.tiles_run == 4
    np.testing.assert_allclose(fixed.outputs["embedding"], reference.outputs["embedding"], atol=1e-4)


# ---- similarity ---------------------------------------------------------------------------------------
def test_centred_similarity_spreads_where_raw_cosine_saturates() -> None:
    rng = np.random.default_rng(0)
    common = np.full(16, 10.0)
    emb = (common + rng.normal(0, 0.1, size=(6, 6, 16))).astype(np.float32)  # one big shared component
    ran = np.ones((6, 6), bool)
    ran[5, 5] = False
    emb[5, 5] = np.nan
    cells = np.zeros((6, 6), bool)
    cells[0, 0] = True
    raw = similarity_map(emb, ran, cells, "cosine")
    centred = similarity_map(emb, ran, cells, "centred")
    assert raw[ran].min() > 0.99  # uncentred: everything looks the same
    assert centred[0, 0] == pytest.approx(1.0, abs=1e-5) and centred[ran].min() < -0.2
    assert np.isnan(centred[5, 5]) and np.isnan(raw[5, 5])
    mean = emb[ran].mean(axis=0)
    expected = cosine_similarity(emb - mean, emb[0, 0] - mean)
    np.testing.assert_allclose(centred[ran], expected[ran], atol=1e-5)
    with pytest.raises(PluginError, match="covers no processed tile"):
        similarity_map(emb, ran, ~ran, "centred")
    with pytest.raises(PluginError, match="mode"):
        similarity_map(emb, ran, cells, "dot")


def test_open_reuses_the_session_of_the_same_file(bundle: dict[str, Path], tmp_path: Path) -> None:
    import os
    import shutil

    OnnxModel.clear_cache()
    copy = tmp_path / "m.onnx"
    shutil.copy(bundle["embedder"], copy)
    first = OnnxModel.open(copy)
    assert OnnxModel.open(copy) is first  # same file, same options: the session is reused
    assert OnnxModel.open(copy, threads=1) is not first  # other options: a new session
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file changed on disk
    assert OnnxModel.open(copy) is not first
    OnnxModel.clear_cache()
    with pytest.raises(PluginError, match="does not exist"):
        OnnxModel.open(tmp_path / "missing.onnx")

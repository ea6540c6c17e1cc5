"""``explora-geo predict`` in the library: inputs (per-band scene, STAC item), resume, ROI and the one-line
errors. That its files equal the QGIS plugin's is tested in tests/plugin/test_predict_parity.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "qgis_plugin") not in sys.path:  # the installed package maps it; a bare checkout needs the path
    sys.path.append(str(REPO / "qgis_plugin"))
pytest.importorskip("osgeo", reason="the plugin core's writers need GDAL's Python bindings (scripts/setup.sh)")

from explora_geo.cli import main


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from explora_geo.export import export_onnx

    tiny = _load("make_tiny_bundle", REPO / "tests" / "plugin" / "make_tiny_bundle.py")
    out = tmp_path_factory.mktemp("bundles")
    backbone, head = tiny.build_backbone(out), tiny.build_head(out)
    return {"classifier": export_onnx(backbone, out / "classifier.onnx", head=head)[0],
            "embedder": export_onnx(backbone, out / "embedder.onnx")[0]}


def _predict(capsys: Any, *argv: str) -> tuple[int, dict | None, str]:
    status = main(["predict", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return status, (json.loads(lines[-1]) if status == 0 else None), captured.err


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read()


def _gdal_info(path: Path) -> dict:
    from osgeo import gdal

    return gdal.Info(str(path), format="json")


def test_scene_of_band_files_then_resume(bundles, t33uuu_dir, tmp_path, capsys):
    out = tmp_path / "run"
    status, summary, _ = _predict(capsys, "--bundle", str(bundles["classifier"]), "--data", str(t33uuu_dir),
                                  "--out", str(out))
    assert status == 0 and summary["finished"] == 1 and summary["skipped"] == 0
    (entry,) = summary["inputs"]
    assert entry["name"] == "T33UUU_20170216T102101" and entry["tiles_run"] == entry["tiles"] == 48 * 24
    classes = out / "T33UUU_20170216T102101_classes.tif"
    ids = _read(classes)[0]
    assert ids.shape == (24, 48) and set(np.unique(ids)) <= {0, 1, 2}
    prob = _read(out / "T33UUU_20170216T102101_probability.tif")[0]
    assert (prob > 1 / 3).all() and (prob <= 1).all() and np.ptp(prob) > 0  # real data: the tiles differ
    assert (out / "T33UUU_20170216T102101_grid.gpkg").exists()
    for tif in (classes, out / "T33UUU_20170216T102101_probability.tif"):  # Cloud-Optimized GeoTIFFs
        info = _gdal_info(tif)
        assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG", info["metadata"]
    band = _gdal_info(classes)["bands"][0]
    assert band["categories"] == ["water", "vegetation", "built-up"] and band["colorInterpretation"] == "Palette"
    assert band["colorTable"]["entries"][:3] == [[31, 120, 180, 255], [51, 160, 44, 255], [227, 26, 28, 255]]
    before = classes.stat().st_mtime_ns
    status, summary, err = _predict(capsys, "--bundle", str(bundles["classifier"]), "--data", str(t33uuu_dir),
                                    "--out", str(out))
    assert status == 0 and summary["skipped"] == 1 and summary["finished"] == 0
    assert "finished in an earlier run, skipped" in err and classes.stat().st_mtime_ns == before


def test_stac_item_and_roi(bundles, t33uuu_dir, t33uuu_root, tmp_path, capsys):
    import datetime as dt

    import pystac

    item = pystac.Item("S2_item", None, None, dt.datetime(2017, 2, 16, tzinfo=dt.UTC), {})
    for jp2 in sorted(t33uuu_dir.glob("*.jp2")):
        item.add_asset(jp2.stem.rsplit("_", 1)[1], pystac.Asset(str(jp2), media_type="image/jp2"))
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item.to_dict()))
    status, full, _ = _predict(capsys, "--bundle", str(bundles["embedder"]), "--data", str(path), "--out",
                               str(tmp_path / "full"))
    assert status == 0 and full["inputs"][0]["name"] == "S2_item"
    emb = _read(tmp_path / "full" / "S2_item_embedding.tif")
    assert emb.shape == (64, 24, 48) and np.isfinite(emb).all()
    status, part, _ = _predict(capsys, "--bundle", str(bundles["embedder"]), "--data", str(path), "--out",
                               str(tmp_path / "roi"), "--roi", str(t33uuu_root / "s2l1c_ref.gpkg"),
                               "--min-valid", "0.01")
    assert status == 0 and 0 < part["inputs"][0]["tiles_run"] < full["inputs"][0]["tiles_run"]
    roi = _read(tmp_path / "roi" / "S2_item_embedding.tif")
    ran = roi[0] != -9999.0
    np.testing.assert_array_equal(roi[:, ~ran], -9999.0)


def test_errors_are_one_line(bundles, t33uuu_dir, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), foreign)
    used = tmp_path / "used"
    assert _predict(capsys, "--bundle", str(bundles["classifier"]), "--data", str(t33uuu_dir), "--out",
                    str(used))[0] == 0
    before = sorted(p.name for p in used.iterdir())
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    cases = [
        (["--bundle", str(garbage), "--data", str(t33uuu_dir), "--out", str(tmp_path / "a")],
         "garbage.onnx is not a usable explora-geo ONNX bundle"),
        (["--bundle", str(foreign), "--data", str(t33uuu_dir), "--out", str(tmp_path / "a")],
         "has no explora-geo metadata"),
        (["--bundle", str(bundles["classifier"]), "--data", str(t33uuu_dir / "*_B0[234].jp2"), "--out",
          str(tmp_path / "a")], "lacks band(s) B08, B05, B06, B07, B8A, B11, B12"),
        (["--bundle", str(bundles["embedder"]), "--data", str(t33uuu_dir), "--out", str(used)],
         f"--out {used} holds another run"),
        (["--bundle", str(bundles["classifier"]), "--data", str(t33uuu_dir), "--out", str(stray)],
         "is not empty and holds no predict run"),
        (["--bundle", str(bundles["classifier"]), "--data", str(t33uuu_dir), "--out", str(tmp_path / "a"),
          "--stride", "64"], "--stride 64 must be between 1 and the model's tile size 32 px"),
    ]
    for argv, message in cases:
        status, _, err = _predict(capsys, *argv)
        err = err.strip().splitlines()[-1]
        assert status == 2 and err.startswith("explora-geo predict: error: ") and message in err, err
    assert sorted(p.name for p in used.iterdir()) == before and not (tmp_path / "a").exists()
    assert [p.name for p in stray.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmenter bundle (a tiny ExploraSegmentationTask trained a few steps, exported)."""
    from explora_geo.export import export_onnx

    tiny = _load("make_tiny_bundle", REPO / "tests" / "plugin" / "make_tiny_bundle.py")
    out = tmp_path_factory.mktemp("segmenter")
    return export_onnx(tiny.build_segmenter(out, tiny.build_backbone(out)), out / "segmenter.onnx")[0]


BANDS = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]


def _window(t33uuu_dir: Path, path: Path, row: int, col: int, height: int, width: int, nan: bool = False) -> Path:
    """A multi-band GeoTIFF of a window of the real T33UUU scene (float32 with NaN pixels when ``nan``)."""
    import rasterio
    from affine import Affine

    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.fast import HandlePool, read_window

    (scene,) = build_catalog(t33uuu_dir, bands=BANDS).sources
    pixels = read_window(scene, HandlePool(), row, col, height, width)
    if nan:
        pixels = pixels.astype(np.float32)
        holes = np.random.default_rng(0).random(pixels.shape[1:]) < 0.02
        holes[40:90, :30] = True
        pixels[:, holes] = np.nan
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=len(BANDS),
                       dtype=pixels.dtype, crs=scene.crs, transform=scene.transform @ Affine.translation(col, row)) as dst:
        dst.write(pixels)
        dst.descriptions = tuple(BANDS)
    return path


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    """The rasters (pixels, georeferencing, nodata, categories, colours) and grids (features) are identical."""
    from osgeo import gdal, ogr

    for name in names:
        if name.endswith(".gpkg"):
            rows = []
            for folder in (a, b):
                source = ogr.Open(str(folder / name))
                rows.append([(f.GetFID(), f.items(), f.GetGeometryRef().ExportToWkb()) for f in source.GetLayer(0)])
                source = None
            assert rows[0] == rows[1], name
            continue
        x, y = gdal.Open(str(a / name)), gdal.Open(str(b / name))
        np.testing.assert_array_equal(x.ReadAsArray(), y.ReadAsArray(), err_msg=name)
        assert x.GetGeoTransform() == y.GetGeoTransform() and x.GetProjection() == y.GetProjection(), name
        for bx, by in ((x.GetRasterBand(i + 1), y.GetRasterBand(i + 1)) for i in range(min(x.RasterCount, 3))):
            assert (bx.GetDescription(), bx.GetNoDataValue()) == (by.GetDescription(), by.GetNoDataValue())
            assert bx.GetCategoryNames() == by.GetCategoryNames()
            tx, ty = bx.GetColorTable(), by.GetColorTable()
            assert (tx is None) == (ty is None)
            if tx is not None:
                assert [tx.GetColorEntry(i) for i in range(tx.GetCount())] == [
                    ty.GetColorEntry(i) for i in range(ty.GetCount())]
        assert x.GetMetadata("IMAGE_STRUCTURE")["LAYOUT"] == "COG", name
        x = y = None


def test_parts_of_one_raster_equal_the_whole_and_resume(bundles, segmenter, t33uuu_dir, tmp_path, capsys):
    """One raster split into bands of tile rows (``--part-rows``): the merged files equal a run of the whole
    raster, pixel for pixel (classifier with NaN and partial tiles; segmenter, whose windows overlap the part
    borders); an interrupted run keeps its finished parts and the rerun runs only the others."""
    from explora_geo.data.catalog import build_catalog
    from explora_geo.predict import PredictSettings, open_bundle, predict

    data = _window(t33uuu_dir, tmp_path / "scene.tif", 100, 300, 200, 384, nan=True)
    for kind, names, part_rows in (("classifier", ["scene_classes.tif", "scene_probability.tif", "scene_grid.gpkg"],
                                    "2"),
                                   ("segmenter", ["scene_segmentation.tif"], "3")):
        bundle = bundles["classifier"] if kind == "classifier" else segmenter
        whole, split = tmp_path / f"{kind}_whole", tmp_path / f"{kind}_split"
        status, one, _ = _predict(capsys, "--bundle", str(bundle), "--data", str(data), "--out", str(whole))
        assert status == 0 and one["inputs"][0]["parts"] == 1
        # interrupted in its third part ...
        model = open_bundle(bundle, "cpu")
        catalog = build_catalog(str(data), bands=list(model.info.bands))
        seen = []

        def stop(name: str, percent: float, seen: list = seen) -> None:
            seen.append(percent)
            if len([p for p in seen if p > 0]) and percent > 40:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            predict(bundle, catalog, split, PredictSettings(part_rows=int(part_rows)), model=model, progress=stop,
                    log=lambda _: None)
        finished = sorted(p.name for p in (split / "parts" / "scene").glob("p*.json"))
        assert finished and not (split / "done" / "scene.json").exists()
        # ... resumed: the finished parts are skipped, the rest run, then merged
        status, summary, err = _predict(capsys, "--bundle", str(bundle), "--data", str(data), "--out", str(split),
                                        "--part-rows", part_rows)
        (entry,) = summary["inputs"]
        assert status == 0 and entry["parts"] >= 4 and f"{len(finished)} part(s) finished in an earlier run" in err
        assert "merged" in err and not (split / "parts" / "scene").exists()
        for key in ("tiles_run", "tiles", "tiles_partial"):
            assert entry[key] == one["inputs"][0][key], key
        assert entry["tiles_partial"] > 0 or kind == "segmenter"
        _same_files(whole, split, names)


@pytest.mark.slow
def test_two_processes_split_the_inputs(bundles, t33uuu_dir, tmp_path):
    """``--devices 2``: Lightning's predict loop (DDP, gloo on CPU) runs the inputs on two ranks; rank 0 merges
    the records and prints one summary; the files equal a single-process run's."""
    import os
    import subprocess

    import rasterio
    from affine import Affine

    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.fast import HandlePool, read_window

    bands = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    (scene,) = build_catalog(t33uuu_dir, bands=bands).sources
    data = tmp_path / "rasters"
    data.mkdir()
    for k, col in enumerate((0, 256, 512)):
        pixels = read_window(scene, HandlePool(), 128, col, 256, 256)
        transform = scene.transform @ Affine.translation(col, 128)
        with rasterio.open(data / f"part{k}.tif", "w", driver="GTiff", width=256, height=256, count=len(bands),
                           dtype=pixels.dtype, crs=scene.crs, transform=transform) as dst:
            dst.write(pixels)
            dst.descriptions = tuple(bands)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "qgis_plugin")])}

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "explora_geo", "predict", "--bundle", str(bundles["embedder"]), "--data",
               str(data), "--out", str(out), *extra]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)

    two, one = run(tmp_path / "two", "--devices", "2"), run(tmp_path / "one")
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-2000:]
    lines = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["finished"] == 3  # one summary (rank 0), every input
    assert "[rank 0] part0" in two.stderr and "[rank 1] part1" in two.stderr and "[rank 0] part2" in two.stderr
    for k in range(3):
        a = _read(tmp_path / "two" / f"part{k}_embedding.tif")
        np.testing.assert_array_equal(a, _read(tmp_path / "one" / f"part{k}_embedding.tif"))
    again = run(tmp_path / "two", "--devices", "2")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["skipped"] == 3


@pytest.mark.slow
def test_two_processes_split_one_raster(bundles, segmenter, t33uuu_dir, tmp_path):
    """``--devices 2 --part-rows N``: one raster's parts run on two ranks (Lightning DDP, gloo on CPU), rank 0
    merges them after the barrier; the files are identical in pixels, georeferencing and metadata to one
    process running the whole raster, for a classifier (grid included) and a segmenter (windows overlapping
    the part borders); a rerun skips the raster."""
    import os
    import subprocess

    data = _window(t33uuu_dir, tmp_path / "scene.tif", 64, 256, 256, 320, nan=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "qgis_plugin")])}

    def run(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "explora_geo", "predict", "--bundle", str(bundle), "--data", str(data),
               "--out", str(out), *extra]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=env)

    for bundle, names, part_rows in (
            (bundles["classifier"], ["scene_classes.tif", "scene_probability.tif", "scene_grid.gpkg"], "2"),
            (segmenter, ["scene_segmentation.tif"], "3")):
        two = run(bundle, tmp_path / f"two_{bundle.stem}", "--devices", "2", "--part-rows", part_rows)
        one = run(bundle, tmp_path / f"one_{bundle.stem}")
        assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-2000:]
        lines = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1 and lines[0]["finished"] == 1 and lines[0]["inputs"][0]["parts"] >= 4
        assert "[rank 0] scene.tif part 1/" in two.stderr and "[rank 1] scene.tif part 2/" in two.stderr
        assert json.loads(one.stdout.splitlines()[-1])["inputs"][0]["tiles_run"] == lines[0]["inputs"][0]["tiles_run"]
        _same_files(tmp_path / f"one_{bundle.stem}", tmp_path / f"two_{bundle.stem}", names)
        assert not (tmp_path / f"two_{bundle.stem}" / "parts" / "scene").exists()
    again = run(segmenter, tmp_path / "two_segmenter", "--devices", "2", "--part-rows", "3")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["skipped"] == 1

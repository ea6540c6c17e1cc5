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

"""Prepared patch stores: ``prepare_store`` / ``explora-geo prepare`` on real Sentinel-2 data (T33UUU crops
as GeoTIFFs, one reprojected to EPSG:4326), the store's content and metadata, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from explora_geo.data.catalog import build_catalog
from explora_geo.data.prepare import catalog_skipping_unreadable, prepare_store
from explora_geo.data.stats import load_stats, normalization_from_stats
from explora_geo.data.store import METADATA_FILE, STATS_FILE, read_store_metadata
from explora_geo.errors import ExploraGeoError

REPO = Path(__file__).resolve().parents[2]
BANDS = ["B02", "B03", "B04", "B08"]


def read_t33uuu(t33uuu_dir: Path) -> tuple[np.ndarray, Any, Any]:
    """The four 10 m bands of the real T33UUU crop: ``(pixels [4, H, W] uint16, transform, crs)``."""
    import rasterio

    arrays = []
    for band in BANDS:
        (path,) = t33uuu_dir.glob(f"*_{band}.jp2")
        with rasterio.open(path) as src:
            arrays.append(src.read(1))
            transform, crs = src.transform, src.crs
    return np.stack(arrays), transform, crs


def write_crop(path: Path, pixels: np.ndarray, transform: Any, crs: Any, row: int, col: int, size: int,
               to_crs: str | None = None) -> Path:
    """A tiled GeoTIFF of ``pixels[:, row:row+size, col:col+size]`` (band descriptions = BANDS); with
    ``to_crs`` the crop is reprojected (bilinear, at about the same ground resolution)."""
    import rasterio
    from rasterio.warp import Resampling, calculate_default_transform, reproject
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    crop = pixels[:, row:row + size, col:col + size]
    crop_transform = window_transform(Window(col, row, size, size), transform)
    out_crs, out_transform, width, height = crs, crop_transform, size, size
    if to_crs is not None:
        bounds = rasterio.transform.array_bounds(size, size, crop_transform)
        out_transform, width, height = calculate_default_transform(crs, to_crs, size, size,
                                                                   *bounds)
        out = np.zeros((crop.shape[0], height, width), dtype=crop.dtype)
        reproject(crop, out, src_transform=crop_transform, src_crs=crs, dst_transform=out_transform,
                  dst_crs=to_crs, resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
        crop, out_crs = out, to_crs
    profile = {"driver": "GTiff", "width": width, "height": height, "count": crop.shape[0],
               "dtype": str(crop.dtype), "crs": out_crs, "transform": out_transform, "tiled": True,
               "blockxsize": 64, "blockysize": 64, "compress": "deflate", "nodata": 0}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(crop)
        dst.descriptions = tuple(BANDS)
    return path


def stream_raw(store: str | Path) -> list[dict[str, Any]]:
    """Every sample of a store, raw, in store order."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(store))
    samples = [ds[i] for i in range(len(ds))]
    for s in samples:
        s["source"] = bytes(s["source"]).decode()
    return samples


@pytest.fixture(scope="module")
def t33(t33uuu_dir: Path) -> tuple[np.ndarray, Any, Any]:
    return read_t33uuu(t33uuu_dir)


def test_utm_and_geographic_files_are_both_sampled_on_their_own_grids(t33: Any, tmp_path: Path) -> None:
    pixels, transform, crs = t33
    data = tmp_path / "data"
    data.mkdir()
    utm = write_crop(data / "utm.tif", pixels, transform, crs, 0, 0, 256)
    geo = write_crop(data / "geo4326.tif", pixels, transform, crs, 300, 700, 256, to_crs="EPSG:4326")
    catalog = build_catalog(data, bands=["B04", "B03", "B02"])
    summary = prepare_store(catalog, tmp_path / "store", patches=40, patch_size=48, workers=2, seed=1,
                            progress=False)
    assert summary["patches_requested"] == 40
    assert summary["patches_written"] + summary["patches_rejected"] == 40
    assert {g["crs"] for g in summary["groups"]} == {"EPSG:32633"}  # the 4326 file read in its UTM zone
    samples = stream_raw(tmp_path / "store")
    assert len(samples) == summary["patches_written"] > 20
    sources = {s["source"] for s in samples}
    assert sources == {str(utm), str(geo)}, sources
    with __import__("rasterio").open(utm) as src:
        native = src.read([3, 2, 1])
        utm_left, utm_top = src.transform.c, src.transform.f
    for s in samples:
        image = s["image"]
        assert image.shape == (3, 48, 48) and image.dtype == np.uint16 and s["crs"] == "EPSG:32633"
        assert (image.reshape(3, -1).std(axis=1) > 0).all(), "constant patch"
        assert s["valid_mask"].dtype == bool and s["valid_mask"].mean() >= 0.5
        left, bottom, right, top = s["bounds"]
        assert right - left == pytest.approx(480) and top - bottom == pytest.approx(480)
        if s["source"] == str(utm):  # native grid: the stored pixels are the file's own, bands reordered
            col, row = round((left - utm_left) / 10), round((utm_top - top) / 10)
            assert (left - utm_left) / 10 == pytest.approx(col)  # pixel-aligned: no resampling
            assert (utm_top - top) / 10 == pytest.approx(row)
            np.testing.assert_array_equal(image, native[:, row:row + 48, col:col + 48])


def test_store_content_metadata_and_statistics(t33: Any, tmp_path: Path) -> None:
    pixels, transform, crs = t33
    data = tmp_path / "data"
    data.mkdir()
    write_crop(data / "a.tif", pixels, transform, crs, 0, 0, 200)
    write_crop(data / "b.tif", pixels, transform, crs, 200, 600, 160)
    catalog = build_catalog(data, bands=["B08", "B02"])
    summary = prepare_store(catalog, tmp_path / "store", patches=30, patch_size=32, workers=1,
                            provenance={"query": "test"}, progress=False)
    store = tmp_path / "store"
    meta = read_store_metadata(store)
    assert meta["bands"] == ["B08", "B02"] and meta["patch_size"] == 32 and meta["gsd_m"] == 10.0
    assert meta["counts"]["written"] == summary["patches_written"] and meta["provenance"] == {"query": "test"}
    assert meta["sensor"] == "sentinel2" and meta["nodata"] == 0.0 and meta["dn_offset"] == 0.0
    # area-proportional split between the two files: 200^2 vs 160^2 px, one CRS group here
    samples = stream_raw(store)
    assert sorted(s["patch_id"] for s in samples) == sorted({s["patch_id"] for s in samples})
    # statistics: exact over the valid pixels of the written patches, in the stats schema
    values = np.concatenate([s["image"][:, s["valid_mask"]] for s in samples], axis=1).astype(np.float64)
    stats = load_stats(store / STATS_FILE)
    assert stats == meta["stats"] and stats["pixels"] == values.shape[1]
    np.testing.assert_allclose(stats["mean"], values.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(stats["std"], values.std(axis=1), rtol=1e-8)
    np.testing.assert_allclose(stats["min"], values.min(axis=1))
    norm = normalization_from_stats(store / STATS_FILE, "meanstd", bands=["B02"])
    assert norm.bands == ("B02",) and norm.mean == (pytest.approx(values[1].mean()),)
    assert not list(tmp_path.glob(".store.partial-*"))  # the staging folder is gone


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``explora-geo ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    from explora_geo.cli import main

    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_prepare_cli_summary_overwrite_and_errors(t33: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pixels, transform, crs = t33
    data = tmp_path / "data"
    data.mkdir()
    write_crop(data / "a.tif", pixels, transform, crs, 100, 100, 128)
    out = tmp_path / "store"
    args = ["prepare", "--data", str(data), "--bands", "B02,B03", "--out", str(out), "--patches", "12",
            "--patch-size", "32", "--workers", "1"]
    status, stdout, stderr = run_cli(capsys, *args)
    assert status == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["patches_written"] == 12 and "12 requested, 12 written, 0 rejected" in stderr
    status, _, stderr = run_cli(capsys, *args)
    assert status == 2 and stderr.strip().splitlines() == [
        (f"explora-geo prepare: error: --out {out} already exists and is not empty; pass --overwrite or "
         "another --out.")]
    assert run_cli(capsys, *args, "--overwrite", "--seed", "3")[0] == 0
    assert read_store_metadata(out)["seed"] == 3
    status, _, stderr = run_cli(capsys, "prepare", "--data", str(data), "--bands", "B02", "--out",
                                str(tmp_path / "zero"), "--patches", "0", "--patch-size", "32")
    assert status == 2 and "--patches 0" in stderr and len(stderr.strip().splitlines()) == 1
    status, _, stderr = run_cli(capsys, "prepare", "--data", str(data), "--bands", "B02", "--out",
                                str(tmp_path / "big"), "--patches", "5", "--patch-size", "500")
    last = stderr.strip().splitlines()[-1]
    assert status == 2 and "larger than every input" in last and "a.tif, 128 x 128 px" in last
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "store"]  # nothing else was written


def test_corrupt_files_are_skipped_counted_and_named(t33: Any, tmp_path: Path) -> None:
    pixels, transform, crs = t33
    data = tmp_path / "data"
    data.mkdir()
    write_crop(data / "good.tif", pixels, transform, crs, 0, 0, 192)
    # a Cloud-Optimized GeoTIFF (header first) cut at half its size: it opens, but half its tiles are gone
    import rasterio.shutil

    plain = write_crop(tmp_path / "plain.tif", pixels, transform, crs, 300, 300, 192)
    truncated = data / "truncated.tif"
    rasterio.shutil.copy(plain, truncated, driver="COG", blocksize=64, compress="deflate", overviews="none")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    (data / "garbage.tif").write_bytes(b"not a tiff at all" * 100)  # not even a header
    catalog, skipped = catalog_skipping_unreadable(data, bands=BANDS)
    assert [Path(s["path"]).name for s in skipped] == ["garbage.tif"] and "garbage.tif" in skipped[0]["error"]
    assert {s.name for s in catalog.sources} == {"good.tif", "truncated.tif"}
    summary = prepare_store(catalog, tmp_path / "store", patches=60, patch_size=32, workers=2, progress=False,
                            skipped_files=skipped)
    named = {Path(s["path"]).name for s in summary["files_skipped"]}
    assert named == {"garbage.tif", "truncated.tif"}
    assert summary["patches_unreadable"] > 0
    total = summary["patches_written"] + summary["patches_rejected"] + summary["patches_unreadable"]
    assert total == 60
    assert {s["source"] for s in stream_raw(tmp_path / "store")} == {str(data / "good.tif")}
    assert {Path(s["path"]).name for s in read_store_metadata(tmp_path / "store")["files_skipped"]} == named


def test_rejected_patches_are_counted_and_an_all_nodata_input_writes_nothing(t33: Any, tmp_path: Path) -> None:
    pixels, transform, crs = t33
    holes = pixels.copy()
    holes[:, :, :150] = 0  # the left 150 of 200 columns are nodata
    data = tmp_path / "data"
    data.mkdir()
    write_crop(data / "holes.tif", holes, transform, crs, 0, 0, 200)
    catalog = build_catalog(data, bands=BANDS)
    summary = prepare_store(catalog, tmp_path / "store", patches=50, patch_size=32, workers=1, progress=False,
                            max_nodata_fraction=0.2)
    assert summary["patches_rejected"] > 10 and summary["patches_written"] > 5
    assert summary["patches_written"] + summary["patches_rejected"] == 50
    for s in stream_raw(tmp_path / "store"):
        assert 1 - s["valid_mask"].mean() <= 0.2
    empty = np.zeros_like(pixels)
    write_crop(tmp_path / "empty.tif", empty, transform, crs, 0, 0, 128)
    with pytest.raises(ExploraGeoError, match="no patch written: 8 of 8 had more than 50% nodata"):
        prepare_store(build_catalog(tmp_path / "empty.tif", bands=BANDS), tmp_path / "none", patches=8,
                      patch_size=32, workers=1, progress=False)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.partial-*"))


def test_grid_sampler_keeps_at_most_patches_positions(t33: Any, tmp_path: Path) -> None:
    pixels, transform, crs = t33
    write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 128)
    catalog = build_catalog(tmp_path / "a.tif", bands=BANDS)
    full = prepare_store(catalog, tmp_path / "all", patches=100, patch_size=32, sampler="grid", workers=1,
                         progress=False)
    assert full["patches_requested"] == 16  # a 4 x 4 grid of 32 px in 128 px
    samples = stream_raw(tmp_path / "all")
    assert len({tuple(s["bounds"]) for s in samples}) == 16
    part = prepare_store(catalog, tmp_path / "part", patches=5, patch_size=32, sampler="grid", workers=1,
                         progress=False)
    assert part["patches_requested"] == 5
    assert {tuple(s["bounds"]) for s in stream_raw(tmp_path / "part")} <= {tuple(s["bounds"]) for s in samples}


def test_incomplete_or_foreign_folders_are_refused(t33: Any, tmp_path: Path) -> None:
    pixels, transform, crs = t33
    write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 96)
    prepare_store(build_catalog(tmp_path / "a.tif", bands=BANDS), tmp_path / "store", patches=4, patch_size=32,
                  workers=1, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "store", broken)
    (broken / METADATA_FILE).unlink()  # as a prepare killed before its last write would leave it
    with pytest.raises(ExploraGeoError, match="incomplete"):
        read_store_metadata(broken)
    with pytest.raises(ExploraGeoError, match="does not exist"):
        read_store_metadata(tmp_path / "nothing")
    (broken / METADATA_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ExploraGeoError, match="not an explora-geo patch store"):
        read_store_metadata(broken)


UNREACHABLE = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
               "AWS_EC2_METADATA_DISABLED": "true"}


def test_unreachable_store_url_is_one_line_exit_2(t33: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pixels, transform, crs = t33
    write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 96)
    for key, value in UNREACHABLE.items():
        monkeypatch.setenv(key, value)
    status, _, stderr = run_cli(capsys, "prepare", "--data", str(tmp_path / "a.tif"), "--bands", "B02", "--out",
                                "s3://explora-test/store", "--patches", "4", "--patch-size", "32")
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1, stderr
    assert "cannot reach store s3://explora-test/store" in lines[0] and "credentials" in lines[0]
    with pytest.raises(ExploraGeoError, match="cannot reach store s3://explora-test/other"):
        read_store_metadata("s3://explora-test/other")


def test_full_disk_removes_the_partial_store(t33: Any, tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], check=False).returncode != 0:
        pytest.skip("needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs")
    pixels, transform, crs = t33
    write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 256)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=400k tmpfs {disk} && {sys.executable} -m explora_geo prepare --data "
              f"{tmp_path / 'a.tif'} --bands B02,B03,B04,B08 --out {disk}/store --patches 200 --patch-size 64 "
              f"--workers 1; echo rc=$?; ls -A {disk}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], check=False, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert "rc=2" in done.stdout, (done.stdout, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert "disk full" in last and f"{disk}/store" in last and "partial store was removed" in last
    assert done.stdout.strip().splitlines()[-1] == "rc=2"  # `ls -A` printed nothing: the tmpfs is empty


def test_roi_in_another_crs_confines_the_patches(t33: Any, tmp_path: Path) -> None:
    import geopandas as gpd
    import shapely

    pixels, transform, crs = t33
    path = write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 256)
    left, top = transform.c, transform.f
    box = shapely.box(left, top - 2560, left + 1280, top)  # the left half of the crop, in UTM
    roi = tmp_path / "roi.gpkg"
    gpd.GeoDataFrame(geometry=[box], crs=crs.to_string()).to_crs("EPSG:4326").to_file(roi)
    summary = prepare_store(build_catalog(path, bands=BANDS), tmp_path / "store", patches=20, patch_size=32,
                            roi=str(roi), workers=1, progress=False)
    assert summary["patches_written"] == 20
    for s in stream_raw(tmp_path / "store"):
        x0, y0, x1, y1 = s["bounds"]
        assert box.buffer(10).contains(shapely.box(x0, y0, x1, y1)), s["bounds"]
    outside = tmp_path / "far.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:4326").to_file(outside)
    with pytest.raises(ExploraGeoError, match="region of interest does not overlap"):
        prepare_store(build_catalog(path, bands=BANDS), tmp_path / "none", patches=5, patch_size=32,
                      roi=str(outside), workers=1, progress=False)


# ----------------------------------------------------------------------------------------------------------
# Several nodes: LitData's multi-node optimize (DATA_OPTIMIZER_NUM_NODES / DATA_OPTIMIZER_NODE_RANK)
# ----------------------------------------------------------------------------------------------------------

def _node_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "explora_geo", "prepare", "--data", str(data), "--bands", "B02,B08", "--out",
            str(out), "--patches", "160", "--patch-size", "32", "--workers", "1", "--seed", "3", *extra]


def _start_nodes(commands: list[list[str]], timeout_s: str = "120") -> list[tuple[int, str, str]]:
    """Run one process per node (rank = position), all at once, as on separate machines sharing a folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATA_OPTIMIZER_NUM_NODES": str(len(commands)),
           "EXPLORA_PREPARE_NODE_TIMEOUT_S": timeout_s}
    procs = [subprocess.Popen(c, env={**env, "DATA_OPTIMIZER_NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for r, c in enumerate(commands)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out, err))
    return results


def _patch_set(store: Path) -> set[tuple[Any, ...]]:
    return {(int(s["patch_id"]), tuple(np.round(s["bounds"], 6)), s["source"], np.asarray(s["image"]).tobytes())
            for s in stream_raw(store)}


def test_two_nodes_make_the_store_of_one_node(t33: Any, tmp_path: Path) -> None:
    """Two node processes writing one shared folder give the same patches (as a set) as one node, same seed."""
    pixels, transform, crs = t33
    data = tmp_path / "data"
    data.mkdir()
    write_crop(data / "a.tif", pixels, transform, crs, 0, 0, 256)
    write_crop(data / "b.tif", pixels, transform, crs, 300, 600, 200)
    single = prepare_store(build_catalog(data, bands=["B02", "B08"]), tmp_path / "one", patches=160, patch_size=32,
                           workers=1, seed=3, progress=False)
    out = tmp_path / "two"
    results = _start_nodes([_node_command(data, out), _node_command(data, out)])
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    node0, node1 = (json.loads(o.strip().splitlines()[-1]) for _, o, _ in results)
    assert node0["node"] == 0 and 0 < node0["node_patches_written"] < single["patches_written"]
    assert node1["nodes"] == 2 and node1["patches_written"] == single["patches_written"]  # the merging node
    two = _patch_set(out)
    assert len(two) == single["patches_written"] == read_store_metadata(out)["counts"]["written"]
    assert two == _patch_set(tmp_path / "one")
    assert read_store_metadata(out)["stats"]["pixels"] == read_store_metadata(tmp_path / "one")["stats"]["pixels"]
    assert not (out / ".explora-prepare").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one", "two"]  # no staging left beside


def test_a_failed_node_leaves_an_incomplete_store_and_the_others_stop(t33: Any, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pixels, transform, crs = t33
    data = tmp_path / "data"
    data.mkdir()
    write_crop(data / "a.tif", pixels, transform, crs, 0, 0, 256)
    out = tmp_path / "store"
    # node 0 fails while planning (a patch larger than the data); node 1 does its share, then must not hang
    results = _start_nodes([_node_command(data, out, "--patch-size", "5000"), _node_command(data, out)],
                           timeout_s="600")
    (rc0, _, err0), (rc1, _, err1) = results
    assert rc0 == 2 and len(err0.strip().splitlines()[-1:]) == 1 and "larger than every input" in err0, err0
    assert rc1 == 2, err1[-2000:]
    last = err1.strip().splitlines()[-1]
    assert "node 0: " in last and "larger than every input" in last and "incomplete" in last, last
    assert list(out.glob("*.bin")) or list((out / ".explora-prepare").rglob("*.bin"))  # node 1's work is kept
    with pytest.raises(ExploraGeoError, match="incomplete"):
        read_store_metadata(out)
    status, _, stderr = run_cli(capsys, "pretrain", "--data", str(out), "--bands", "B02,B08", "--model",
                                "vit_tiny_patch16_224", "--weights", "random", "--out", str(tmp_path / "run"))
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "incomplete" in stderr, stderr


def test_a_node_that_never_finishes_makes_the_others_give_up(t33: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 1 of 2 never starts (killed, out of quota): node 0 writes its share, then stops at the timeout."""
    pixels, transform, crs = t33
    write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 256)
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "2")
    monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", "0")
    monkeypatch.setenv("EXPLORA_PREPARE_NODE_TIMEOUT_S", "3")
    import time

    started = time.monotonic()
    with pytest.raises(ExploraGeoError, match=r"waited 3 s .* node 1 to finish the store.*incomplete"):
        prepare_store(build_catalog(tmp_path / "a.tif", bands=["B02"]), tmp_path / "store", patches=160,
                      patch_size=32, workers=1, progress=False)
    assert time.monotonic() - started < 60
    with pytest.raises(ExploraGeoError, match="incomplete"):
        read_store_metadata(tmp_path / "store")
    with pytest.raises(ExploraGeoError, match="left from an earlier prepare"):  # a rerun must start clean
        prepare_store(build_catalog(tmp_path / "a.tif", bands=["B02"]), tmp_path / "store", patches=160,
                      patch_size=32, workers=1, progress=False)


def test_prepare_workers_run_one_torch_thread(t33: Any, tmp_path: Path) -> None:
    """torch's intra-op threads in every worker process fight over the cores (2.1x slower per patch measured)."""
    import torch

    from explora_geo.data import prepare as prep

    pixels, transform, crs = t33
    write_crop(tmp_path / "a.tif", pixels, transform, crs, 0, 0, 128)
    catalog = build_catalog(tmp_path / "a.tif", bands=BANDS)
    groups, _ = prep._plan(catalog, 4, 32, "random", None, 0)
    writer = prep._ShardWriter([groups[0].dataset], ["EPSG:32633"], catalog.files, {}, catalog.nodata, 0.0, 0.5,
                               64, 100, 0, str(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        list(writer((0, 0, groups[0].boxes)))
        assert torch.get_num_threads() == 2  # the calling process keeps its threads
        writer._parent_pid = -1  # as in a LitData worker process
        list(writer((0, 1, groups[0].boxes)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

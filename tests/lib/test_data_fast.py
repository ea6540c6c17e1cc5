"""The on-the-fly path: the fast and the torchgeo readers cut the same pixels on each file's grid, any CRS mix
(geographic included) is sampled correctly, and open files stay bounded with an honest error at the limit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_nodata import smooth, write_tif

from explora_geo.data.catalog import build_catalog
from explora_geo.data.fast import HandlePool, PatchReader
from explora_geo.data.sampling import PatchDataset, Window
from explora_geo.errors import ExploraGeoError

BANDS = ["B02", "B03", "B04"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def two_zones(tmp_path: Path) -> Path:
    """Two tiled DEFLATE files in different UTM zones, 3 bands, 200 x 260 px (not a multiple of the tile)."""
    folder = tmp_path / "zones"
    write_tif(folder / "z33.tif", smooth((3, 200, 260), 1), descriptions=BANDS, crs="EPSG:32633")
    write_tif(folder / "z32.tif", smooth((3, 200, 260), 2), descriptions=BANDS, crs="EPSG:32632",
              origin=(700000.0, 5800000.0))
    return folder


@pytest.mark.parametrize("crs", ["EPSG:32633", "EPSG:32632"])
def test_fast_and_torchgeo_paths_are_pixel_identical_in_two_zones(two_zones: Path, crs: str) -> None:
    """Whatever the catalog CRS, both readers read each file on its own grid: no resampling on either."""
    import rasterio

    cat = build_catalog(two_zones, bands=["B04", "B02"], crs=crs)
    fast = PatchDataset(cat, patch_size=48, length=8, seed=3)
    slow = PatchDataset(cat, patch_size=48, length=8, seed=3, fast=False)
    rng = np.random.default_rng(0)
    for index, source in enumerate(cat.sources):
        assert (source.width, source.height) == (260, 200) and source.crs == rasterio.open(source.files[0]).crs
        for _ in range(3):
            window = Window(index, int(rng.integers(0, 200 - 48)), int(rng.integers(0, 260 - 48)), 48)
            got = fast.read(window)
            with rasterio.open(source.files[0]) as src:
                direct = src.read([3, 1], window=((window.row, window.row + 48), (window.col, window.col + 48)))
            np.testing.assert_array_equal(got, direct)
            np.testing.assert_array_equal(slow.read(window), direct.astype(np.float32))
    fast.close()
    slow.close()


def test_fast_and_torchgeo_datasets_agree_on_real_scene(t33uuu_dir: Path) -> None:
    """Per-band JP2 files at 10/20/60 m: resampled bands match torchgeo exactly as well."""
    bands = ["B02", "B05", "B09", "B8A"]
    cat = build_catalog(t33uuu_dir, bands=bands)
    fast = PatchDataset(cat, patch_size=48, length=6, seed=2)
    slow = PatchDataset(cat, patch_size=48, length=6, seed=2, fast=False)
    for i in range(6):
        window = fast.windows.draw(np.random.default_rng([2, 0, i, 0]))
        np.testing.assert_array_equal(fast.read(window), slow.read(window).astype(np.uint16))


def test_two_workers_match_one_process(two_zones: Path) -> None:
    cat = build_catalog(two_zones, bands=BANDS)
    ds = PatchDataset(cat, patch_size=40, length=24, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    parallel = torch.cat([b["image"] for b in loader])
    serial = PatchDataset(cat, patch_size=40, length=24, seed=5)
    expected = torch.stack([serial[i]["image"] for i in range(24)])
    torch.testing.assert_close(parallel, expected, rtol=0, atol=0)
    assert ds.reader._pid == -1  # the parent never opened a file: workers opened their own


# --------------------------------------------------------------------------------------------------------
# A UTM file beside an EPSG:4326 file (real Sentinel-2 pixels)
# --------------------------------------------------------------------------------------------------------

DEG_10M = 10.0 / 111319.49079327357  # 10 m in degrees at the equator (Earth Engine's scale convention)


@pytest.fixture()
def utm_and_4326(t33uuu_dir: Path, tmp_path: Path) -> Path:
    """utm.tif: a 512 x 512 crop of the real T33UUU B02/B03/B04 (10 m, EPSG:32633); wgs84.tif: another crop
    of the same scene exported to EPSG:4326 at 10 m-equivalent degrees (bilinear), as Earth Engine does."""
    import rasterio
    from rasterio.warp import Resampling, calculate_default_transform, reproject
    from rasterio.windows import Window as RWindow
    from rasterio.windows import transform as window_transform

    arrays, crs, transforms = [], None, {}
    for band in BANDS:
        with rasterio.open(next(t33uuu_dir.glob(f"*_{band}.jp2"))) as src:
            crs = src.crs
            for name, window in (("utm", RWindow(0, 128, 512, 512)), ("geo", RWindow(768, 128, 512, 512))):
                transforms[name] = window_transform(window, src.transform)
            arrays.append(src.read(1))
    stack = np.stack(arrays)
    folder = tmp_path / "mixed"
    folder.mkdir()
    profile = dict(driver="GTiff", count=3, dtype="uint16", tiled=True, blockxsize=128, blockysize=128,
                   compress="deflate")
    with rasterio.open(folder / "utm.tif", "w", crs=crs, transform=transforms["utm"], width=512, height=512,
                       **profile) as dst:
        dst.write(stack[:, 128:640, 0:512])
        dst.descriptions = tuple(BANDS)
    geo_src = stack[:, 128:640, 768:1280]
    left, top = transforms["geo"].c, transforms["geo"].f
    dst_t, w, h = calculate_default_transform(crs, "EPSG:4326", 512, 512, left, top - 5120, left + 5120, top,
                                              resolution=DEG_10M)
    out = np.zeros((3, h, w), dtype=np.uint16)
    reproject(geo_src, out, src_transform=transforms["geo"], src_crs=crs, dst_transform=dst_t,
              dst_crs="EPSG:4326", resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
    with rasterio.open(folder / "wgs84.tif", "w", crs="EPSG:4326", transform=dst_t, width=w, height=h,
                       nodata=0, **profile) as dst:
        dst.write(out)
        dst.descriptions = tuple(BANDS)
    return folder


@pytest.mark.parametrize("crs", ["EPSG:32633", "EPSG:4326"])
def test_utm_beside_4326_both_sampled_on_10m_grids(utm_and_4326: Path, t33uuu_dir: Path, crs: str) -> None:
    import rasterio
    from rasterio.windows import from_bounds
    from rasterio.windows import transform as window_transform

    cat = build_catalog(utm_and_4326, bands=BANDS, crs=crs)
    assert cat.gsd == pytest.approx((10.0, 10.0), rel=1e-3)
    by_name = {s.name: s for s in cat.sources}
    utm, geo = by_name["utm.tif"], by_name["wgs84.tif"]
    assert (utm.width, utm.height) == (512, 512) and utm.crs.to_epsg() == 32633  # its own grid, untouched
    assert geo.crs.to_epsg() == 32633 and abs(geo.transform.a - 10.0) < 1e-6  # local UTM zone, 10 m pixels
    assert 512 <= geo.width <= 560 and 512 <= geo.height <= 560  # the 5.12 km footprint, plus warp margins
    assert geo.transform.c % 10 == 0 and geo.transform.f % 10 == 0  # pixel edges on multiples of the GSD
    assert any("UTM zone" in note for note in cat.notes)

    ds = PatchDataset(cat, patch_size=64, length=40, seed=1, max_nodata_fraction=0.1)
    seen = {0: 0, 1: 0}
    for i in range(40):
        item = ds[i]
        seen[int(item["source"])] += 1
        image = item["image"].numpy()
        assert image.std(axis=(1, 2)).min() > 1.0, "a constant patch"
        assert 200 < image.mean() < 5000  # Sentinel-2 L1C digital numbers
    assert min(seen.values()) >= 5, seen

    # a patch of the 4326 file is the same ground as the original scene at that place (two bilinear
    # resamplings apart): compare it with the source JP2 read at the patch's UTM bounds
    index = cat.sources.index(geo)
    window = Window(index, 200, 200, 64)
    got = ds.read(window).astype(np.float64)
    bounds = rasterio.windows.bounds(rasterio.windows.Window(200, 200, 64, 64), geo.transform)
    with rasterio.open(next(t33uuu_dir.glob("*_B03.jp2"))) as src:
        ref_window = from_bounds(*bounds, src.transform)
        assert window_transform(ref_window, src.transform).almost_equals(window_transform(
            rasterio.windows.Window(200, 200, 64, 64), geo.transform), precision=1e-6)
        ref = src.read(1, window=ref_window).astype(np.float64)
        shifted = src.read(1, window=rasterio.windows.Window(ref_window.col_off + 2, ref_window.row_off, 64, 64))
    diff = np.abs(got[1] - ref).mean()
    assert np.corrcoef(got[1].ravel(), ref.ravel())[0, 1] > 0.9
    assert diff < 0.15 * ref.std() and diff < 0.6 * np.abs(got[1] - shifted).mean(), diff

    # the torchgeo path reads the same unit on the same UTM grid (through its own warp: close, not equal)
    slow = PatchDataset(cat, patch_size=64, length=12, seed=1, max_nodata_fraction=0.1, fast=False)
    slow_seen = {0: 0, 1: 0}
    for i in range(12):
        item = slow[i]
        slow_seen[int(item["source"])] += 1
        assert item["image"].numpy().std(axis=(1, 2)).min() > 1.0, "a constant patch (torchgeo path)"
    assert min(slow_seen.values()) >= 2, slow_seen
    tg = slow.read(window).astype(np.float64)
    assert np.abs(tg - got).mean() < 0.1 * got.std()
    np.testing.assert_array_equal(slow.read(Window(cat.sources.index(utm), 10, 20, 64)),
                                  ds.read(Window(cat.sources.index(utm), 10, 20, 64)).astype(np.float32))
    ds.close()
    slow.close()


# --------------------------------------------------------------------------------------------------------
# File handles
# --------------------------------------------------------------------------------------------------------

def test_handle_pool_closes_least_recently_used(two_zones: Path, tmp_path: Path) -> None:
    paths = [str(write_tif(tmp_path / "many" / f"f{k}.tif", smooth((3, 16, 16), k), descriptions=BANDS))
             for k in range(5)]
    cat = build_catalog(tmp_path / "many", bands=BANDS)
    pool = HandlePool(3)
    handles = [pool.get(p, cat.sources[k]) for k, p in enumerate(paths[:3])]
    pool.get(paths[0], cat.sources[0])  # touch f0: f1 is now the least recently used
    pool.get(paths[3], cat.sources[3])
    assert len(pool) == 3 and handles[1].src.closed and not handles[0].src.closed
    pool.get(paths[4], cat.sources[4])
    assert handles[2].src.closed and not handles[0].src.closed and pool.opened == 5
    pool.close()
    assert handles[0].src.closed and len(pool) == 0
    with pytest.raises(ExploraGeoError, match="max_open_files 0"):
        PatchReader(cat.sources, max_open_files=0)


_SUBPROCESS = textwrap.dedent("""
    import os, resource, sys
    sys.path.insert(0, {repo!r})
    import torch
    from explora_geo.data import PretrainDataModule
    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.fast import PatchReader, default_max_open
    from explora_geo.errors import ExploraGeoError

    folder = {folder!r}
    mode = sys.argv[1]
    if mode == "limit128":
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        assert default_max_open() == 32
        dm = PretrainDataModule(folder, bands=["B02", "B03", "B04"], patch_size=16, batch_size=16,
                                num_workers=0, samples_per_epoch=256, normalization=None, seed=0)
        one = torch.cat([b["image"] for b in dm.train_dataloader()])
        pool = dm.dataset.reader.pool
        assert len(pool) <= 32 and pool.opened > 32, (len(pool), pool.opened)
        sources = set(torch.cat([b["source"] for b in dm.train_dataloader()]).tolist())
        assert len(sources) > 48, len(sources)
        dm2 = PretrainDataModule(folder, bands=["B02", "B03", "B04"], patch_size=16, batch_size=16,
                                 num_workers=2, samples_per_epoch=256, normalization=None, seed=0)
        two = torch.cat([b["image"] for b in dm2.train_dataloader()])
        assert torch.equal(one, two)
        dm3 = PretrainDataModule(folder, bands=["B02", "B03", "B04"], patch_size=16, batch_size=16,
                                 num_workers=0, samples_per_epoch=256, normalization=None, seed=0, fast=False)
        three = torch.cat([b["image"] for b in dm3.train_dataloader()])
        assert torch.equal(one, three)  # the torchgeo path: same pixels, its handle cache kept under the limit
        print("OK", len(sources))
    else:
        cat = build_catalog(folder, bands=["B02", "B03", "B04"])
        reader = PatchReader(cat.sources, max_open_files=1000)
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            for k in range(len(cat.sources)):
                reader.read(k, 0, 0, 8, 8)
        except ExploraGeoError as err:
            print("ERR", err)
""")


@pytest.fixture(scope="module")
def sixty_four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sixty_four")
    for k in range(64):
        write_tif(folder / f"tile_{k:02d}.tif", smooth((3, 32, 32), k), descriptions=BANDS,
                  origin=(300000.0 + 320 * (k % 8), 5800000.0 - 320 * (k // 8)))
    return folder


def _run(folder: Path, mode: str) -> str:
    script = _SUBPROCESS.format(repo=str(REPO), folder=str(folder))
    done = subprocess.run([sys.executable, "-c", script, mode], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_64_files_under_a_soft_limit_of_128_open_files(sixty_four: Path) -> None:
    assert _run(sixty_four, "limit128").startswith("OK")


def test_running_out_of_descriptors_says_so_and_does_not_blame_the_file(sixty_four: Path) -> None:
    out = _run(sixty_four, "exhaust")
    assert out.startswith("ERR too many open files in this process (limit "), out
    assert "ulimit -n" in out and "fewer DataLoader workers" in out and "replace or remove" not in out
    assert out.count("\n") == 1  # one line

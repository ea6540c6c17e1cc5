"""The fast path returns exactly torchgeo's pixels; its block cache is exact, bounded and multi-process safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_nodata import smooth, write_tif

from explora_geo.data.catalog import build_catalog
from explora_geo.data.datasets import open_dataset
from explora_geo.data.fast import PatchReader, _cache_block
from explora_geo.data.sampling import PatchDataset, Window

BANDS = ["B02", "B03", "B04"]


@pytest.fixture()
def two_zones(tmp_path: Path) -> Path:
    """Two tiled DEFLATE files in different UTM zones, 3 bands, 200 x 260 px (not a multiple of the tile)."""
    folder = tmp_path / "zones"
    write_tif(folder / "z33.tif", smooth((3, 200, 260), 1), descriptions=BANDS, crs="EPSG:32633")
    write_tif(folder / "z32.tif", smooth((3, 200, 260), 2), descriptions=BANDS, crs="EPSG:32632",
              origin=(700000.0, 5800000.0))
    return folder


def _torchgeo_window(ds: object, transform: object, row: int, col: int, size: int, res: float) -> np.ndarray:
    left, top = transform @ (col, row)  # type: ignore[operator]
    sample = ds[left:left + size * res:res, top - size * res:top:res]  # type: ignore[index]
    return sample["image"].numpy()


@pytest.mark.parametrize("cached", [True, False])
def test_fast_equals_torchgeo_for_each_file_in_its_crs(two_zones: Path, tmp_path: Path, cached: bool) -> None:
    rng = np.random.default_rng(0)
    for crs in ("EPSG:32633", "EPSG:32632"):
        cat = build_catalog(two_zones, bands=["B04", "B02"], crs=crs)
        ds = open_dataset(catalog=cat)
        index = next(i for i, s in enumerate(cat.sources) if s.crs == cat.crs)
        source = cat.sources[index]
        reader = PatchReader(cat.sources, cache_dir=tmp_path / "cache", cache_bytes=None if cached else 0)
        for _ in range(4):
            row, col = int(rng.integers(0, source.height - 48)), int(rng.integers(0, source.width - 48))
            fast = reader.read(index, row, col, 48, 48)
            assert fast.dtype == np.uint16
            expected = _torchgeo_window(ds, source.transform, row, col, 48, 10)
            np.testing.assert_array_equal(fast.astype(np.float32), expected)
        reader.close()


def test_cache_fills_blocks_and_stays_exact(two_zones: Path, tmp_path: Path) -> None:
    cat = build_catalog(two_zones, bands=BANDS)
    reader = PatchReader(cat.sources, cache_dir=tmp_path / "cache")
    direct = PatchReader(cat.sources, cache_bytes=0)
    first = reader.read(0, 70, 100, 64, 64)
    cache = reader._caches[0]
    # 64-px tiles grouped by 4 (capped by the 200 x 260 size): blocks of 200 rows x 256 cols
    assert _cache_block(cat.sources[0]) == (200, 256)
    # window rows 70..133, cols 100..163 lie in block (0, 0) only
    assert cache.done.sum() == 1 and cache.done[0, 0]
    again = reader.read(0, 70, 100, 64, 64)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, direct.read(0, 70, 100, 64, 64))
    # a window across the block edge decodes the partial edge block too, and is exact
    np.testing.assert_array_equal(reader.read(0, 150, 200, 50, 60), direct.read(0, 150, 200, 50, 60))
    assert cache.done.sum() == 2
    # a second reader (another process or run) reuses the decoded blocks from disk
    other = PatchReader(cat.sources, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(other.read(0, 70, 100, 64, 64), first)
    assert other._caches[0].done.sum() == cache.done.sum()
    with pytest.raises(IndexError):
        reader.read(0, 190, 0, 64, 64)


@pytest.mark.parametrize(("block", "shape", "expected"), [
    ((512, 512), (4096, 4096), (512, 512)),  # COG tiles kept
    ((64, 64), (1000, 1000), (256, 256)),  # small JPEG2000 blocks grouped
    ((1, 900), (700, 900), (256, 900)),  # one-row strips grouped into 256-row bands
    ((64, 64), (100, 120), (100, 120)),  # capped by the raster size
])
def test_cache_blocks_are_tile_aligned(block: tuple[int, int], shape: tuple[int, int],
                                       expected: tuple[int, int]) -> None:
    from affine import Affine

    from explora_geo.data.catalog import Source

    source = Source("x", (("x.tif", 1),), None, Affine.identity(), shape[1], shape[0], block, None)
    rows, cols = _cache_block(source)
    assert (rows, cols) == expected
    assert rows % block[0] == 0 or rows == shape[0]
    assert cols % block[1] == 0 or cols == shape[1]


def test_cache_is_bounded(two_zones: Path, tmp_path: Path) -> None:
    cat = build_catalog(two_zones, bands=BANDS)
    one_unit = 3 * 200 * 260 * 2
    reader = PatchReader(cat.sources, cache_dir=tmp_path / "cache", cache_bytes=one_unit + 10)
    assert reader.cached == [True, False] and reader.cached_bytes == one_unit
    reader.read(1, 0, 0, 32, 32)
    reader.read(0, 0, 0, 32, 32)
    assert len(list((tmp_path / "cache").glob("*.done.npy"))) == 1


def test_stale_entries_are_pruned_least_recently_used_first(two_zones: Path, tmp_path: Path) -> None:
    cat = build_catalog(two_zones, bands=BANDS)
    folder = tmp_path / "cache"
    unit = 3 * 200 * 260 * 2
    PatchReader(cat.sources[:1], cache_dir=folder).read(0, 0, 0, 200, 260)  # fills unit 0 completely
    PatchReader(cat.sources[1:], cache_dir=folder).read(0, 0, 0, 200, 260)  # fills unit 1 completely
    assert len(list(folder.glob("*.done.npy"))) == 2
    # a reader of unit 1 alone with room for one unit: unit 0's entry is stale and goes
    PatchReader(cat.sources[1:], cache_dir=folder, cache_bytes=unit + 4096)
    assert len(list(folder.glob("*.done.npy"))) == 1
    # with room for both, nothing is removed
    PatchReader(cat.sources[:1], cache_dir=folder).read(0, 0, 0, 8, 8)
    PatchReader(cat.sources[1:], cache_dir=folder, cache_bytes=3 * unit)
    assert len(list(folder.glob("*.done.npy"))) == 2


def test_cache_key_changes_when_the_file_changes(two_zones: Path, tmp_path: Path) -> None:
    cat = build_catalog(two_zones, bands=BANDS)
    reader = PatchReader(cat.sources, cache_dir=tmp_path / "cache")
    before = reader.read(0, 0, 0, 16, 16)
    path = cat.sources[0].channels[0][0]
    write_tif(Path(path), smooth((3, 200, 260), 9), descriptions=BANDS,
              crs=str(cat.sources[0].crs), origin=(cat.sources[0].transform.c, cat.sources[0].transform.f))
    fresh = PatchReader(build_catalog(two_zones, bands=BANDS).sources, cache_dir=tmp_path / "cache")
    after = fresh.read(0, 0, 0, 16, 16)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, PatchReader(fresh.sources, cache_bytes=0).read(0, 0, 0, 16, 16))


def test_two_workers_share_the_cache_and_match_one_process(two_zones: Path, tmp_path: Path) -> None:
    cat = build_catalog(two_zones, bands=BANDS)
    ds = PatchDataset(cat, patch_size=40, length=24, seed=5, cache_dir=tmp_path / "cache")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    parallel = torch.cat([b["image"] for b in loader])
    serial = PatchDataset(cat, patch_size=40, length=24, seed=5, cache_bytes=0)
    expected = torch.stack([serial[i]["image"] for i in range(24)])
    torch.testing.assert_close(parallel, expected, rtol=0, atol=0)
    assert ds.reader._pid == -1  # the parent never opened a file: workers opened their own


def test_fast_and_torchgeo_datasets_agree_on_real_scene(t33uuu_dir: Path, tmp_path: Path) -> None:
    """Per-band JP2 files at 10/20/60 m: resampled bands match torchgeo exactly as well."""
    bands = ["B02", "B05", "B09", "B8A"]
    cat = build_catalog(t33uuu_dir, bands=bands)
    fast = PatchDataset(cat, patch_size=48, length=6, seed=2, cache_dir=tmp_path / "cache")
    slow = PatchDataset(cat, patch_size=48, length=6, seed=2, fast=False)
    for i in range(6):
        window = fast.windows.draw(np.random.default_rng([2, 0, i, 0]))
        assert isinstance(window, Window)
        np.testing.assert_array_equal(fast.read(window), slow.read(window).astype(np.uint16))


def test_unwritable_cache_folder_is_a_clear_error(two_zones: Path, tmp_path: Path) -> None:
    from explora_geo.errors import ExploraGeoError

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    cat = build_catalog(two_zones, bands=BANDS)
    with pytest.raises(ExploraGeoError, match="cannot use the cache folder"):
        PatchReader(cat.sources, cache_dir=blocker / "cache", cache_bytes=1 << 30).read(0, 0, 0, 8, 8)

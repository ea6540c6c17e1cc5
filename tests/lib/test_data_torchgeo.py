"""Our datasets inside plain torchgeo code: samplers, stack_samples, ROI, union with another dataset."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
import torch
from test_data_nodata import smooth, write_tif
from torch.utils.data import DataLoader
from torchgeo.datasets import UnionDataset, stack_samples
from torchgeo.samplers import GriddedPatchSampler, RandomPatchSampler

from explora_geo.data import MosaicDataset, roi_polygon

BANDS = ["B02", "B03", "B04", "B08"]


def _mosaic(folder: Path, crs: str = "EPSG:32633") -> Path:
    write_tif(folder / "a.tif", smooth((4, 96, 128), 1), descriptions=BANDS, crs=crs)
    write_tif(folder / "b.tif", smooth((4, 96, 128), 2), descriptions=BANDS, crs=crs, origin=(301280.0, 5800000.0))
    return folder


def test_random_and_gridded_samplers_with_stack_samples(tmp_path: Path) -> None:
    ds = MosaicDataset(_mosaic(tmp_path / "m"), bands=["B08", "B04"])
    random = RandomPatchSampler(ds, size=32, length=6, generator=0)
    batch = next(iter(DataLoader(ds, sampler=random, batch_size=6, collate_fn=stack_samples)))
    assert batch["image"].shape == (6, 2, 32, 32) and batch["image"].dtype == torch.float32
    grid = list(GriddedPatchSampler(ds, size=32, stride=32))
    assert len(grid) == 3 * 8  # 96 rows x 256 cols of 10 m pixels
    first = ds[grid[0]]["image"]
    assert first.shape == (2, 32, 32) and first.min() > 0


def test_roi_polygon_restricts_torchgeo_samplers(tmp_path: Path) -> None:
    ds = MosaicDataset(_mosaic(tmp_path / "m"), bands=BANDS)
    box = shapely.box(300000.0, 5799040.0, 300640.0, 5800000.0)  # the west 64 x 96 px of a.tif
    gpd.GeoDataFrame(geometry=[box], crs="EPSG:32633").to_crs("EPSG:4326").to_file(tmp_path / "roi.gpkg")
    roi = roi_polygon(tmp_path / "roi.gpkg", ds.crs)
    assert roi.area > 0.99 * box.area
    for x, y in RandomPatchSampler(ds, size=16, length=20, roi=roi, generator=1):
        assert 299990 <= x.start and x.stop <= 300650


def test_union_with_another_dataset(tmp_path: Path) -> None:
    east = MosaicDataset(_mosaic(tmp_path / "e"), bands=BANDS)
    far = MosaicDataset(_mosaic(tmp_path / "f", crs="EPSG:32632"), bands=BANDS)
    union = UnionDataset(east, far)
    assert union.crs == east.crs and len(union) == 4


def test_mixed_crs_and_resolution_are_warped_to_one_grid(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_tif(folder / "utm33_10m.tif", smooth((4, 96, 96), 1), descriptions=BANDS)
    # a 20 m file in UTM 32N that lies just west of the first one (UTM 33N's 300 km easting ~ 32N's 700 km)
    import pyproj

    x, y = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:32632", always_xy=True).transform(299000.0, 5800000.0)
    write_tif(folder / "utm32_20m.tif", smooth((4, 48, 48), 2) + 5000, descriptions=BANDS, crs="EPSG:32632",
              origin=(x - 960.0, y), res=20.0)
    ds = MosaicDataset(folder, bands=["B04"], crs="EPSG:32633", res=10.0)
    assert ds.res == (10.0, 10.0) and ds.crs.to_epsg() == 32633
    # a patch inside the reprojected 20 m file has its (shifted) values, on the 10 m grid
    minx, miny, maxx, maxy = ds.index[ds.index.filepath.str.endswith("utm32_20m.tif")].total_bounds
    cx, cy = round((minx + maxx) / 20) * 10, round((miny + maxy) / 20) * 10
    patch = ds[cx - 160:cx + 160:10, cy - 160:cy + 160:10]["image"]
    assert patch.shape == (1, 32, 32) and patch.min() > 5000


def test_files_with_different_band_orders_are_read_by_name(tmp_path: Path) -> None:
    import rasterio

    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.fast import PatchReader

    folder = tmp_path / "orders"
    a = write_tif(folder / "a.tif", smooth((4, 64, 64), 1), descriptions=BANDS)
    b = write_tif(folder / "b.tif", smooth((4, 64, 64), 2), descriptions=BANDS[::-1], origin=(300640.0, 5800000.0))
    ds = MosaicDataset(folder, bands=["B04", "B08"])
    # one patch straddling both files: the west half from a.tif (bands 3, 4), the east half from b.tif (2, 1)
    patch = ds[300320:300960:10, 5799360:5800000:10]["image"].numpy()
    with rasterio.open(a) as src:
        west = src.read([3, 4], window=((0, 64), (32, 64)))
    with rasterio.open(b) as src:
        east = src.read([2, 1], window=((0, 64), (0, 32)))
    np.testing.assert_array_equal(patch[:, :, :32], west)
    np.testing.assert_array_equal(patch[:, :, 32:], east)
    cat = build_catalog(folder, bands=["B04", "B08"])
    reader = PatchReader(cat.sources)
    np.testing.assert_array_equal(reader.read(1, 0, 0, 64, 32), east)

"""Labelled data: chip folders, band selection by name, splits, vector labels -> chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_downstream_common import S2_L1C_FILE_ORDER, band_valued_chip, make_chip_folder, write_chip

from explora_geo.downstream.labeled import (
    EUROSAT_FILE_BANDS,
    ChipDataset,
    resolve_file_bands,
    scan_chip_folder,
    stratified_split,
)
from explora_geo.downstream.mosaic import vector_labels_to_chips
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import get_sensor


# ---- chip folders -----------------------------------------------------------------------------------------

def test_scan_chip_folder_indexes_classes_in_sorted_order(tmp_path: Path) -> None:
    make_chip_folder(tmp_path, {"b_water": 2, "a_forest": 3})
    index = scan_chip_folder(tmp_path)
    assert index.classes == ("a_forest", "b_water")
    assert sorted(index.labels) == [0, 0, 0, 1, 1]
    assert all(p.parent.name == index.classes[y] for p, y in zip(index.paths, index.labels, strict=True))


def test_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    make_chip_folder(tmp_path, {"forest": 2, "water": 2})
    (tmp_path / "urban").mkdir()
    with pytest.raises(ExploraGeoError, match="urban"):
        scan_chip_folder(tmp_path)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    make_chip_folder(tmp_path, {"forest": 3})
    with pytest.raises(ExploraGeoError, match="single class"):
        scan_chip_folder(tmp_path)


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ExploraGeoError, match="does not exist"):
        scan_chip_folder(tmp_path / "nope")


# ---- band names ---------------------------------------------------------------------------------------------

def test_resolve_file_bands_from_descriptions_layouts_and_lists(tmp_path: Path) -> None:
    described = write_chip(tmp_path / "d.tif", band_valued_chip(["B04", "B03"]), ["B04", "B03"])
    bare = write_chip(tmp_path / "e.tif", band_valued_chip(list(EUROSAT_FILE_BANDS)))
    assert resolve_file_bands(None, described) == ["B04", "B03"]
    assert resolve_file_bands("eurosat", bare)[-1] == "B8A"
    assert resolve_file_bands("sentinel2", bare) == get_sensor("sentinel2").band_names
    assert resolve_file_bands("b4, b3", described) == ["b4", "b3"]
    with pytest.raises(ExploraGeoError, match="without names"):
        resolve_file_bands(None, bare)
    with pytest.raises(ExploraGeoError, match="has 2 bands"):
        resolve_file_bands("eurosat", described)


def test_chip_dataset_picks_bands_by_name_in_model_order(tmp_path: Path) -> None:
    # Files in EuroSAT order (B8A last) without descriptions; the model wants B8A, B02, B12.
    write_chip(tmp_path / "a" / "1.tif", band_valued_chip(list(EUROSAT_FILE_BANDS)))
    write_chip(tmp_path / "b" / "1.tif", band_valued_chip(list(EUROSAT_FILE_BANDS)))
    ds = ChipDataset(scan_chip_folder(tmp_path), bands=["B8A", "B02", "B12"], file_bands="eurosat")
    image = ds[0]["image"]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    # value 100 * (1-based position in the standard L1C order): B8A=9, B02=2, B12=13
    assert image[:, 0, 0].tolist() == [900.0, 200.0, 1300.0]


def test_chip_dataset_normalises_and_resizes(tmp_path: Path) -> None:
    names = ["B02", "B03"]
    write_chip(tmp_path / "a" / "1.tif", band_valued_chip(names, size=8), names)
    write_chip(tmp_path / "b" / "1.tif", band_valued_chip(names, size=8), names)
    norm = Normalization("reflectance", ("B03", "B02"), divide=1000.0)
    ds = ChipDataset(scan_chip_folder(tmp_path), bands=["B03", "B02"], normalization=norm, img_size=12)
    sample = ds[1]
    assert sample["image"].shape == (2, 12, 12)
    assert torch.allclose(sample["image"][:, 5, 5], torch.tensor([0.3, 0.2]))
    assert sample["label"].item() == 1


def test_l1c_backbone_on_l2a_data_names_the_missing_band(tmp_path: Path) -> None:
    l2a = [b for b in S2_L1C_FILE_ORDER if b != "B10"]
    write_chip(tmp_path / "a" / "1.tif", band_valued_chip(l2a), l2a)
    write_chip(tmp_path / "b" / "1.tif", band_valued_chip(l2a), l2a)
    with pytest.raises(ExploraGeoError, match=r"lacks band\(s\) B10"):
        ChipDataset(scan_chip_folder(tmp_path), bands=get_sensor("sentinel2").band_names)
    # extra bands are simply not selected
    ds = ChipDataset(scan_chip_folder(tmp_path), bands=["B04"])
    assert ds[0]["image"].shape[0] == 1


# ---- splits ---------------------------------------------------------------------------------------------------

def test_stratified_split_is_seeded_disjoint_and_stratified() -> None:
    labels = [0] * 20 + [1] * 10 + [2] * 5
    train, val, test = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    other = stratified_split(labels, (0.6, 0.2, 0.2), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(train, other[0])
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(35))
    y = np.asarray(labels)
    assert np.bincount(y[val]).tolist() == [4, 2, 1]
    assert np.bincount(y[test]).tolist() == [4, 2, 1]


def test_stratified_split_errors() -> None:
    with pytest.raises(ExploraGeoError, match="one class"):
        stratified_split([1, 1, 1, 1])
    with pytest.raises(ExploraGeoError, match="class 1 has only 2 samples"):
        stratified_split([0] * 10 + [1] * 2)
    with pytest.raises(ExploraGeoError, match="summing to 1"):
        stratified_split([0, 1] * 5, (0.5, 0.2, 0.2))


# ---- vector labels -> chips (real T33UUU scene) ---------------------------------------------------------------

def test_vector_labels_outside_the_raster_are_named(t33uuu_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ExploraGeoError, match=r"not fully inside the raster \(features "):
        vector_labels_to_chips(t33uuu_root / "s2l1c_ref.gpkg", t33uuu_root / "IMG_DATA", tmp_path,
                               class_column="cid", chip_size=16)
    assert not any(tmp_path.iterdir())  # nothing written on failure


def test_missing_class_column_lists_the_columns(t33uuu_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ExploraGeoError, match="no class column 'landuse'.*cid"):
        vector_labels_to_chips(t33uuu_root / "s2l1c_ref.gpkg", t33uuu_root / "IMG_DATA", tmp_path,
                               class_column="landuse")


def test_vector_labels_to_chips_in_any_crs(t33uuu_root: Path, tmp_path: Path) -> None:
    import geopandas as gpd
    import rasterio

    src = gpd.read_file(t33uuu_root / "s2l1c_ref.gpkg")
    # Points in WGS 84 at the polygons' representative points: the same chips as from the polygons.
    points = gpd.GeoDataFrame({"cid": src["cid"]}, geometry=src.geometry.representative_point(), crs=src.crs)
    points.to_crs(4326).to_file(tmp_path / "points.gpkg")
    bands = ["B02", "B8A", "B10"]
    a = vector_labels_to_chips(t33uuu_root / "s2l1c_ref.gpkg", t33uuu_root / "IMG_DATA", tmp_path / "poly",
                               class_column="cid", chip_size=16, bands=bands, skip_outside=True)
    b = vector_labels_to_chips(tmp_path / "points.gpkg", t33uuu_root / "IMG_DATA", tmp_path / "pts",
                               class_column="cid", chip_size=16, bands=bands, skip_outside=True)
    assert a.classes == b.classes == ("1", "2")
    assert 20 <= len(a) == len(b) < 30 and a.labels == b.labels
    with rasterio.open(a.paths[0]) as ds_a, rasterio.open(b.paths[0]) as ds_b:
        assert ds_a.descriptions == tuple(bands) and ds_a.crs.to_epsg() == 32633
        assert (ds_a.width, ds_a.height, ds_a.res) == (16, 16, (10.0, 10.0))
        chip_a, chip_b = ds_a.read().astype(float), ds_b.read().astype(float)
    assert np.abs(chip_a - chip_b).mean() < 1.0  # same place up to sub-metre reprojection round-off
    assert chip_a[0].std() > 0  # real imagery, not a constant
    # the written folder is a chip folder, readable by name in another band order
    ds = ChipDataset(scan_chip_folder(tmp_path / "poly"), bands=["B10", "B02"])
    assert torch.equal(ds[0]["image"][1], torch.from_numpy(chip_a[0]).float())


def test_labels_of_a_single_class_are_rejected(t33uuu_root: Path, tmp_path: Path) -> None:
    import geopandas as gpd

    src = gpd.read_file(t33uuu_root / "s2l1c_ref.gpkg")
    src[src["cid"] == 1].to_file(tmp_path / "one.gpkg")
    with pytest.raises(ExploraGeoError, match="single class"):
        vector_labels_to_chips(tmp_path / "one.gpkg", t33uuu_root / "IMG_DATA", tmp_path / "out",
                               class_column="cid", chip_size=16, skip_outside=True)


def test_real_l2a_patches_lack_b10_for_an_l1c_model(bigearthnet_dir: Path, tmp_path: Path) -> None:
    """Real BigEarthNet L2A patches (one GeoTIFF per band, 10/20/60 m, no B10) as a chip folder: an L1C band
    list fails naming B10; the 10 bands of the group-channel ViT are picked by name, extra bands ignored."""
    import json

    import rasterio

    from explora_geo.downstream.mosaic import mosaic_bands, mosaic_grid, read_window, write_geotiff

    for patch in sorted(p for p in bigearthnet_dir.iterdir() if p.is_dir()):
        layout = mosaic_bands(patch)
        names = list(layout)
        crs, res, (left, bottom, right, top) = mosaic_grid(layout, names)
        handles = {n: rasterio.open(layout[n][0]) for n in names}
        try:
            chip = read_window(handles, layout, names, left, top, round((right - left) / res), res)
        finally:
            for h in handles.values():
                h.close()
        label = json.loads(next(patch.glob("*labels_metadata.json")).read_text())["labels"][0]
        target = tmp_path / label[:20].replace(" ", "_") / f"{patch.name}.tif"
        write_geotiff(target, chip, crs, left, top, res, names)
    index = scan_chip_folder(tmp_path)
    assert len(index) == 6 and len(index.classes) >= 2
    with pytest.raises(ExploraGeoError, match=r"lacks band\(s\) B10 "):
        ChipDataset(index, bands=get_sensor("sentinel2").band_names)
    ds = ChipDataset(index, bands=get_sensor("sentinel2").model_bands, img_size=96)
    image = ds[0]["image"]
    assert image.shape == (10, 96, 96) and image.std() > 0


def test_chip_datamodule_makes_its_chips_from_vector_labels(t33uuu_root: Path, tmp_path: Path) -> None:
    from explora_geo.downstream.datamodule import ChipFolderDataModule

    data = ChipFolderDataModule(str(tmp_path / "chips"), vector=str(t33uuu_root / "s2l1c_ref.gpkg"),
                                raster=str(t33uuu_root / "IMG_DATA"), class_column="cid", chip_size=16,
                                skip_outside=True, bands=["B04", "B03", "B02"], img_size=32, batch_size=4)
    assert data.classes == ["1", "2"]
    data.setup("fit")
    sizes = [len(data.splits[k]) for k in ("train", "val", "test")]
    assert sum(sizes) == len(list((tmp_path / "chips").rglob("*.tif"))) and min(sizes) >= 2
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64

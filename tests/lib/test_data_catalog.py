"""Input discovery, band naming, grids, nodata and DN offset; bad input gives one clear error (and CLI exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data_nodata import smooth, write_tif

from explora_geo.cli import main
from explora_geo.data.catalog import build_catalog, dn_offset_from, find_rasters
from explora_geo.data.datasets import BandFilesDataset, MosaicDataset, open_dataset
from explora_geo.errors import ExploraGeoError

RGBN = ["B02", "B03", "B04", "B08"]


@pytest.fixture()
def mosaic(tmp_path: Path) -> Path:
    folder = tmp_path / "mosaic"
    write_tif(folder / "a.tif", smooth((4, 96, 96), 1), descriptions=RGBN)
    write_tif(folder / "b.tif", smooth((4, 96, 96), 2), descriptions=RGBN, origin=(300960.0, 5800000.0))
    (folder / "notes.txt").write_text("not a raster")
    return folder


def test_folder_glob_and_list_find_the_same_files(mosaic: Path) -> None:
    by_folder = find_rasters(mosaic)
    assert [Path(p).name for p in by_folder] == ["a.tif", "b.tif"]
    assert find_rasters(str(mosaic / "*.tif")) == by_folder
    assert find_rasters([mosaic / "b.tif", mosaic / "a.tif"]) == by_folder


def test_bands_by_description_in_requested_order(mosaic: Path) -> None:
    ds = open_dataset(mosaic, bands=["nir", "B02"], sensor="sentinel2")
    assert isinstance(ds, MosaicDataset)
    assert ds.catalog.bands == ("B08", "B02")
    x, y, _ = ds.bounds
    sample = ds[x.start:x.start + 320:10, y.stop - 320:y.stop:10]
    import rasterio

    with rasterio.open(mosaic / "a.tif") as src:
        expected = src.read([4, 1], window=((0, 32), (0, 32))).astype(np.float32)
    assert sample["image"].shape == (2, 32, 32)
    np.testing.assert_array_equal(sample["image"].numpy(), expected)


def test_user_band_names_override_and_must_match_count(mosaic: Path) -> None:
    cat = build_catalog(mosaic, bands=["B04"], band_names=["B04", "B03", "B02", "B08"])
    assert cat.sources[0].channels[0][1] == 1
    with pytest.raises(ExploraGeoError, match=r"a\.tif has 4 bands but 3 band names"):
        build_catalog(mosaic, bands=["B04"], band_names=["B04", "B03", "B02"])


def test_default_crs_and_res_are_chosen_and_reported(tmp_path: Path) -> None:
    write_tif(tmp_path / "big.tif", smooth((4, 64, 64)), descriptions=RGBN, crs="EPSG:32632",
              origin=(700000, 5800000))
    write_tif(tmp_path / "small.tif", smooth((4, 32, 32)), descriptions=RGBN, res=20.0)
    cat = build_catalog(tmp_path, bands=RGBN)
    assert cat.crs.to_epsg() == 32632 and cat.res == (10.0, 10.0)
    assert any("crs chosen: EPSG:32632" in n for n in cat.notes)
    assert "res: 10 x 10" in cat.describe()
    explicit = build_catalog(tmp_path, bands=RGBN, crs="EPSG:32633", res=20)
    assert explicit.crs.to_epsg() == 32633 and explicit.res == (20.0, 20.0)
    # the 20 m file's own grid at 10 m doubles its pixel count
    small = next(s for s in cat.sources if s.name == "small.tif")
    assert (small.width, small.height) == (64, 64)


def test_nodata_from_user_metadata_or_assumed(tmp_path: Path) -> None:
    write_tif(tmp_path / "n.tif", smooth((4, 32, 32)), descriptions=RGBN, nodata=65535)
    assert build_catalog(tmp_path, bands=RGBN).nodata == 65535
    assert build_catalog(tmp_path, bands=RGBN, nodata=7).nodata_origin == "user"
    other = tmp_path / "other"
    write_tif(other / "m.tif", smooth((4, 32, 32)), descriptions=RGBN)
    cat = build_catalog(other, bands=RGBN)
    assert cat.nodata == 0 and cat.nodata_origin.startswith("assumed")


def test_l2a_offset_from_name_tag_or_user(tmp_path: Path) -> None:
    assert dn_offset_from(["/x/S2B_MSIL2A_20230101T100309_N0509_R122_T33UUU.SAFE/B02.jp2"], [{}])[0] == 1000
    assert dn_offset_from(["/x/S2B_MSIL2A_20200101T100309_N0213_R122_T33UUU.SAFE/B02.jp2"], [{}])[0] == 0
    assert dn_offset_from(["/x/S2B_MSIL1C_20230101T100309_N0509_R122.SAFE/B02.jp2"], [{}])[0] == 0
    write_tif(tmp_path / "t.tif", smooth((4, 32, 32)), descriptions=RGBN, tags={"BOA_ADD_OFFSET_B2": "-1000"})
    cat = build_catalog(tmp_path, bands=RGBN)
    assert cat.offset == 1000 and "BOA_ADD_OFFSET" in cat.offset_origin
    assert build_catalog(tmp_path, bands=RGBN, dn_offset=0).offset == 0


def test_per_band_files_form_scenes(tmp_path: Path) -> None:
    write_tif(tmp_path / "T33UUU_20230101T100309_B02_10m.tif", smooth((1, 64, 64)))
    write_tif(tmp_path / "T33UUU_20230101T100309_B05_20m.tif", smooth((1, 32, 32), 1), res=20.0)
    cat = build_catalog(tmp_path, bands=["B05", "B02"])
    assert cat.kind == "band_files" and len(cat.sources) == 1
    assert (cat.sources[0].width, cat.res) == (64, (10.0, 10.0))
    assert [Path(p).name[-11:] for p, _ in cat.sources[0].channels] == ["B05_20m.tif", "B02_10m.tif"]


def test_dataset_of_the_wrong_kind_names_the_right_one(tmp_path: Path, mosaic: Path) -> None:
    write_tif(tmp_path / "scene" / "T33UUU_20230101T100309_B02_10m.tif", smooth((1, 64, 64)))
    with pytest.raises(ExploraGeoError, match="per-band files; use BandFilesDataset or open_dataset"):
        MosaicDataset(tmp_path / "scene", bands=["B02"])
    with pytest.raises(ExploraGeoError, match="multi-band files; use MosaicDataset or open_dataset"):
        BandFilesDataset(mosaic, bands=RGBN)
    bands = BandFilesDataset(tmp_path / "scene", bands=["B02"], nodata=7)
    assert isinstance(open_dataset(tmp_path / "scene", bands=["B02"]), BandFilesDataset)
    assert bands.nodata == 7 and bands.all_bands == bands.catalog.file_bands
    assert MosaicDataset(mosaic, bands=RGBN, nodata=5).nodata == 5


# ------------------------------------------------------------------------------------------ bad input
def _error(data: object, **kwargs: object) -> str:
    with pytest.raises(ExploraGeoError) as info:
        build_catalog(data, **{"bands": RGBN, **kwargs})  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_name_the_culprit(tmp_path: Path, mosaic: Path) -> None:
    assert "does not exist" in _error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "empty" in _error(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    assert "has no raster" in _error(tmp_path / "docs")
    assert "no file matches" in _error(str(tmp_path / "*.nothing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    assert "broken.tif" in _error(bad)
    mixed = tmp_path / "mixed"
    write_tif(mixed / "four.tif", smooth((4, 32, 32)), descriptions=RGBN)
    write_tif(mixed / "four2.tif", smooth((4, 32, 32)), descriptions=RGBN)
    write_tif(mixed / "three.tif", smooth((3, 32, 32)), descriptions=RGBN[:3])
    assert "three.tif has 3 bands" in _error(mixed)
    assert "lacks band(s) B12" in _error(mosaic, bands=["B02", "B12"])
    assert "unknown CRS 'EPSG:99999'" in _error(mosaic, crs="EPSG:99999")
    assert "resolution -5 is not positive" in _error(mosaic, res=-5)
    assert "dn_offset 'yes'" in _error(mosaic, dn_offset="yes")
    assert "no bands requested" in _error(mosaic, bands=[])


CLI_CASES = ["missing", "empty", "no_raster", "corrupt", "band_counts", "band", "all_nodata", "patch", "roi"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_stats_exits_2_with_one_line(tmp_path: Path, mosaic: Path, case: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    extra: list[str] = []
    bands, data = "B02", tmp_path / case
    if case == "empty":
        data.mkdir()
    elif case == "no_raster":
        data.mkdir()
        (data / "readme.md").write_text("x")
    elif case == "corrupt":
        data.mkdir()
        (data / "x.tif").write_bytes(b"not a tiff")
    elif case == "band_counts":
        write_tif(data / "a.tif", smooth((4, 32, 32)), descriptions=RGBN)
        write_tif(data / "b.tif", smooth((3, 32, 32)), descriptions=RGBN[:3])
        extra = ["--patches", "1"]
    elif case == "band":
        data, bands = mosaic, "B02,B12"
    elif case == "all_nodata":
        write_tif(data / "z.tif", np.zeros((4, 32, 32), np.uint16), descriptions=RGBN, nodata=0)
    elif case == "patch":
        data, extra = mosaic, ["--patch-size", "500"]
    elif case == "roi":
        import geopandas as gpd
        import shapely

        gpd.GeoDataFrame(geometry=[shapely.box(10, 40, 10.1, 40.1)], crs="EPSG:4326").to_file(tmp_path / "r.gpkg")
        data, extra = mosaic, ["--roi", str(tmp_path / "r.gpkg")]
    argv = ["stats", "--data", str(data), "--bands", bands, "--patches", "2", "--patch-size", "16", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("explora-geo stats: error:"), err
    expected = {"missing": "does not exist", "empty": "is empty", "no_raster": "has no raster",
                "corrupt": "x.tif", "band_counts": "b.tif has 3 bands", "band": "lacks band(s) B12",
                "all_nodata": "all nodata", "patch": "patch size 500 px is larger",
                "roi": "does not overlap"}[case]
    assert expected in err[0]


def test_cli_stats_writes_json_loadable_as_normalisation(mosaic: Path, tmp_path: Path) -> None:
    from explora_geo.data.stats import load_stats, normalization_from_stats
    from explora_geo.normalization import Normalization

    out = tmp_path / "s" / "stats.json"
    assert main(["stats", "--data", str(mosaic), "--bands", "B08,B02", "--patches", "8", "--patch-size", "32",
                 "--out", str(out)]) == 0
    stats = load_stats(out)
    assert stats["bands"] == ["B08", "B02"] and stats["pixels"] == 8 * 32 * 32
    norm = Normalization.from_dict(stats["normalization"])
    assert norm.scheme == "meanstd" and norm.mean == tuple(stats["mean"])
    satmae = normalization_from_stats(out, "satmae", bands=["B02"])
    assert satmae.bands == ("B02",) and satmae.mean == (stats["mean"][1],)
    assert not list(out.parent.glob("*.tmp"))


def test_l2a_safe_granule_layout(tmp_path: Path) -> None:
    """R10m/R20m/R60m folders form one scene, bands at their native resolution, auxiliary rasters ignored."""
    safe = tmp_path / "S2B_MSIL2A_20230101T100309_N0509_R122_T33UUU_20230101T120000.SAFE"
    img = safe / "GRANULE" / "L2A_T33UUU_A030000_20230101T100310" / "IMG_DATA"
    stem = "T33UUU_20230101T100309"
    layout = {"R10m": (10.0, ["B02", "B03", "B04", "B08"]), "R20m": (20.0, ["B02", "B05", "B8A", "B11"]),
              "R60m": (60.0, ["B01", "B02", "B09"])}
    for folder, (res, bands) in layout.items():
        size = int(640 / res)
        for k, band in enumerate(bands):
            write_tif(img / folder / f"{stem}_{band}_{folder[1:]}.tif", smooth((1, size, size), k), res=res)
    write_tif(img / "R10m" / f"{stem}_TCI_10m.tif", smooth((3, 64, 64)).astype(np.uint8), res=10.0)
    write_tif(img / "R20m" / f"{stem}_SCL_20m.tif", smooth((1, 32, 32)).astype(np.uint8), res=20.0)
    cat = build_catalog(safe, bands=["B02", "B05", "B01"])
    assert cat.kind == "band_files" and len(cat.sources) == 1
    assert [Path(p).parent.name for p, _ in cat.sources[0].channels] == ["R10m", "R20m", "R60m"]
    assert (cat.sources[0].width, cat.res) == (64, (10.0, 10.0))
    assert cat.offset == 1000 and "N0509" in cat.offset_origin
    assert any("ignored 2 auxiliary file(s)" in n for n in cat.notes)


def test_grid_units_is_the_one_grid_step_of_files_and_stac(t33uuu_dir: Path) -> None:
    """``grid_units`` (public) places units on their grids for both catalog builders: a file's own grid at its
    GSD, a coarser grid over its bounds at another, the files' nodata; ``stac`` uses it and no private helper."""
    import ast
    import inspect

    from explora_geo.data import stac
    from explora_geo.data.catalog import grid_units, inspect_raster

    info = inspect_raster(str(next(t33uuu_dir.glob("*_B02.jp2"))))
    units = [("scene", ((info.path, 1),), info)]
    notes: list[str] = []
    native = grid_units(units, crs_from=[info], nodata_from=[info], notes=notes)
    (source,) = native.sources
    assert (source.width, source.height, source.transform) == (info.width, info.height, info.transform)
    assert native.gsd == (10.0, 10.0) and native.crs == info.crs and any("res chosen" in n for n in notes)
    assert (native.nodata, native.nodata_origin) == (
        (info.nodata, "file metadata") if info.nodata is not None else
        (0.0, "assumed: files declare none, 0 is the fill value of mosaic gaps"))
    coarse = grid_units(units, crs_from=[info], nodata_from=[info], res=20.0, nodata=5, notes=[])
    assert coarse.sources[0].width == round(info.width / 2) and coarse.gsd == (20.0, 20.0)
    assert (coarse.nodata, coarse.nodata_origin) == (5.0, "user")
    imported = [alias.name for node in ast.walk(ast.parse(inspect.getsource(stac)))
                if isinstance(node, ast.ImportFrom) and node.module == "explora_geo.data.catalog"
                for alias in node.names]
    assert "grid_units" in imported and not [n for n in imported if n.startswith("_")], imported

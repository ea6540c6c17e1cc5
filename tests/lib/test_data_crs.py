"""CRS helpers: units, GSD conversions, the local UTM zone and its GSD-aligned grid; the catalog's res/GSD."""

from __future__ import annotations

from pathlib import Path

import pytest
from affine import Affine
from test_data_nodata import smooth, write_tif

from explora_geo.data.catalog import build_catalog
from explora_geo.data.crs import gsd_in_units, is_geographic, metres_per_unit, res_in_metres, utm_crs_for, utm_grid


def test_units_and_conversions() -> None:
    assert is_geographic("EPSG:4326") and not is_geographic("EPSG:32633")
    assert metres_per_unit("EPSG:32633") == 1.0
    assert metres_per_unit("EPSG:2227") == pytest.approx(0.3048006, rel=1e-6)  # California, US survey feet
    assert metres_per_unit("EPSG:4326") == pytest.approx(111319.49, rel=1e-6)  # a degree along the equator
    assert gsd_in_units((10.0, 10.0), "EPSG:4326")[0] == pytest.approx(8.983152841e-5, rel=1e-6)
    assert res_in_metres((8.983152841195214e-05,) * 2, "EPSG:4326") == pytest.approx((10.0, 10.0))
    assert gsd_in_units((10.0, 20.0), "EPSG:2227") == pytest.approx((32.808, 65.617), rel=1e-4)


@pytest.mark.parametrize(("lon", "lat", "epsg"), [(13.2, 52.5, 32633), (-70.6, -33.4, 32719), (179.9, 1.0, 32660),
                                                 (-180.0, 10.0, 32601), (0.0, 0.0, 32631)])
def test_utm_zone_of_a_footprint(lon: float, lat: float, epsg: int) -> None:
    assert utm_crs_for((lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01), "EPSG:4326").to_epsg() == epsg


def test_utm_grid_covers_the_footprint_on_gsd_multiples() -> None:
    deg = 10.0 / 111319.49
    crs, transform, width, height = utm_grid("EPSG:4326", Affine(deg, 0, 13.0, 0, -deg, 52.0), 1000, 1000,
                                             (10.0, 10.0))
    assert crs.to_epsg() == 32633 and (transform.a, transform.e) == (10.0, -10.0)
    assert transform.c % 10 == 0 and transform.f % 10 == 0
    # 1000 px of 1.1 m-per-1e-5-degree: ~10 km north-south, ~6.1 km east-west at 52 N (plus a rotation margin)
    assert 990 <= height <= 1040 and 600 <= width <= 700


def test_catalog_res_in_a_geographic_crs_no_file_in_it(tmp_path: Path) -> None:
    """A 4326 catalog CRS over UTM files: res is 10 m in degrees (not "10 degrees"), every unit on 10 m."""
    write_tif(tmp_path / "a.tif", smooth((3, 64, 64)), descriptions=["B02", "B03", "B04"])
    cat = build_catalog(tmp_path, bands=["B02"], crs="EPSG:4326")
    assert cat.res == pytest.approx((8.983e-5, 8.983e-5), rel=1e-3) and cat.gsd == (10.0, 10.0)
    assert (cat.sources[0].width, cat.sources[0].height) == (64, 64)
    assert "GSD 10 m" in cat.describe()

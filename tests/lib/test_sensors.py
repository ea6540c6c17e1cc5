"""Sensor registry and band selection by name."""

from __future__ import annotations

import pytest

from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import SENSORS, canonical_band_name, get_sensor, select_bands


def test_registry_has_the_presets_with_wavelengths_and_gsd() -> None:
    assert {"sentinel2", "sentinel2_l2a", "landsat8", "landsat9", "naip", "rgb"} <= set(SENSORS)
    s2 = get_sensor("sentinel2")
    assert s2.band_names == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
                             "B11", "B12"]
    assert s2.band("B8A").gsd_m == 20.0 and s2.band("B02").gsd_m == 10.0 and s2.band("B10").gsd_m == 60.0
    # Wavelengths increase along the product order for Sentinel-2 (B8A sits between B08 and B09).
    waves = [b.wavelength_nm for b in s2.bands]
    assert waves == sorted(waves)
    l2a = get_sensor("sentinel2-L2A")
    assert "B10" not in l2a.band_names and len(l2a.band_names) == 12
    assert get_sensor("landsat8").band("B8").gsd_m == 15.0
    assert get_sensor("naip").band_names == ["R", "G", "B", "NIR"]


def test_sentinel2_default_groups_are_satmae() -> None:
    s2 = get_sensor("sentinel2")
    assert s2.model_groups == (("B02", "B03", "B04", "B08"), ("B05", "B06", "B07", "B8A"), ("B11", "B12"))
    assert s2.model_bands == ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert s2.rgb == ("B04", "B03", "B02")


@pytest.mark.parametrize(
    ("label", "expected"),
    [("b2", "B02"), ("B02", "B02"), ("band_2", "B02"), ("B8a", "B8A"), ("B08A", "B8A"), ("B12", "B12"),
     ("NIR", "NIR")],
)
def test_canonical_band_name(label: str, expected: str) -> None:
    assert canonical_band_name(label) == expected


def test_select_bands_eurosat_order_puts_b8a_by_name() -> None:
    eurosat = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
    idx = select_bands(eurosat, get_sensor("sentinel2").model_bands)
    assert [eurosat[i] for i in idx] == get_sensor("sentinel2").model_bands
    assert idx[7] == 12  # B8A is the last band of the file


def test_select_bands_uses_sensor_aliases() -> None:
    described = ["blue", "green", "red", "nir"]
    assert select_bands(described, ["B04", "B03", "B02"], sensor="sentinel2") == [2, 1, 0]


def test_missing_band_names_every_missing_band() -> None:
    l2a = get_sensor("sentinel2_l2a").band_names
    with pytest.raises(ExploraGeoError, match=r"scene\.tif lacks band\(s\) B10") as info:
        select_bands(l2a, get_sensor("sentinel2").band_names, source="scene.tif")
    assert "\n" not in str(info.value)


def test_unknown_sensor_and_band_are_clear() -> None:
    with pytest.raises(ExploraGeoError, match="unknown sensor.*sentinel2"):
        get_sensor("sentinel3")
    with pytest.raises(ExploraGeoError, match="unknown band 'B13'.*B01"):
        get_sensor("sentinel2").band("B13")


def test_stats_follow_band_names() -> None:
    s2 = get_sensor("sentinel2")
    mean, std = s2.stats(["B10", "B09"])
    assert mean == [14.77, 582.73] and std == [14.31, 472.38]
    with pytest.raises(ExploraGeoError, match="no built-in band statistics"):
        get_sensor("naip").stats(["R"])

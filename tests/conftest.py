"""Fixtures shared by both test suites (library and QGIS plugin). Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it lives in ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def t33uuu_dir() -> Path:
    """Folder of the real Sentinel-2 L1C T33UUU scene: 13 JP2 bands at 10/20/60 m."""
    return _need(SHARED_DATA / "sentinel2_l1c_T33UUU" / "IMG_DATA")


@pytest.fixture(scope="session")
def t33uuu_root() -> Path:
    """The T33UUU folder with IMG_DATA/ and the two GeoPackages of polygons."""
    return _need(SHARED_DATA / "sentinel2_l1c_T33UUU")


@pytest.fixture(scope="session")
def eurosat_dir() -> Path:
    """200 real EuroSAT-MS chips, 13 bands with B8A LAST, one folder per class."""
    return _need(SHARED_DATA / "eurosat_ms_200")


@pytest.fixture(scope="session")
def bigearthnet_dir() -> Path:
    """6 real BigEarthNet-S2 L2A patches (12 bands, no B10), one GeoTIFF per band."""
    return _need(SHARED_DATA / "bigearthnet_l2a_examples")

"""Nodata masks and filling; also home of ``write_tif``, the small-raster writer the data tests share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from explora_geo.data.nodata import fill_nodata, nodata_fraction, valid_mask


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (300000.0, 5800000.0),
    res: float = 10.0,
    nodata: float | None = None,
    tiled: bool = True,
    block: int = 64,
    descriptions: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
    compress: str | None = "deflate",
) -> Path:
    """Write ``data`` ``[C, H, W]`` as a (tiled, compressed) GeoTIFF with top-left corner ``origin``."""
    import rasterio
    from rasterio.transform import from_origin

    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=str(data.dtype), crs=crs, transform=from_origin(*origin, res, res), nodata=nodata)
    if tiled:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    if compress:
        profile["compress"] = compress
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, text in enumerate(descriptions, start=1):
                dst.set_band_description(i, text)
        if tags:
            dst.update_tags(**tags)
    return path


def smooth(shape: tuple[int, int, int], seed: int = 0, base: float = 1000.0) -> np.ndarray:
    """Smooth positive uint16 test imagery ``[C, H, W]`` (band k is offset by 100 k, so bands differ)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty(shape, dtype=np.uint16)
    for k in range(c):
        fx, fy, phase = rng.uniform(0.01, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        field = base + 100 * k + 300 * np.sin(fx * xx + phase) * np.cos(fy * yy) + rng.normal(0, 5, (h, w))
        out[k] = np.clip(field, 1, 65535).astype(np.uint16)
    return out


def test_valid_mask_needs_all_bands_at_nodata() -> None:
    image = np.ones((3, 4, 5), dtype=np.uint16)
    image[:, 0, 0] = 0  # all bands nodata -> missing
    image[0, 1, 1] = 0  # one band 0 -> still valid
    valid = valid_mask(image, 0)
    assert valid.shape == (4, 5)
    assert not valid[0, 0] and valid[1, 1]
    assert valid.sum() == 19
    assert nodata_fraction(valid) == pytest.approx(1 / 20)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
@pytest.mark.parametrize("nodata", [0, 7, -1, 65535])
def test_valid_mask_matches_the_definition(dtype: str, nodata: int) -> None:
    rng = np.random.default_rng(abs(nodata))
    image = rng.integers(0, 9, size=(4, 16, 16)).astype(dtype)
    info = np.iinfo(np.dtype(dtype)) if dtype != "float32" else None
    representable = info is None or info.min <= nodata <= info.max
    if representable:
        image[:, 3:6, 2:9] = nodata  # a block where all bands are nodata
        image[1, 10, 10] = nodata  # one band only: still valid
        expected = ~(image == nodata).all(axis=0)
        assert not expected[4, 5] and expected[10, 10]
    else:  # a value the dtype cannot hold marks nothing
        expected = np.ones((16, 16), bool)
    np.testing.assert_array_equal(valid_mask(image, nodata), expected)


def test_valid_mask_nan_and_none() -> None:
    image = np.ones((2, 3, 3), dtype=np.float32)
    image[1, 2, 2] = np.nan
    assert valid_mask(image, None).sum() == 8
    assert valid_mask(image, float("nan")).sum() == 8
    assert valid_mask(np.zeros((2, 3, 3), np.uint16), None).all()


def test_fill_uses_band_mean_of_valid_pixels() -> None:
    image = np.zeros((2, 2, 2), dtype=np.uint16)
    image[0] = [[10, 20], [30, 0]]
    image[1] = [[1, 2], [3, 0]]
    valid = valid_mask(image, 0)
    filled = fill_nodata(image, valid)
    assert filled.dtype == np.float32
    assert filled[0, 1, 1] == pytest.approx(20.0) and filled[1, 1, 1] == pytest.approx(2.0)
    assert filled[0, 0, 1] == 20.0  # valid pixels untouched
    assert fill_nodata(image, np.zeros((2, 2), bool)).max() == 0.0

"""Band statistics: exact over the sampled valid pixels, DN offset removed, loadable as a normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data_nodata import smooth, write_tif

from explora_geo.data.stats import PERCENTILES, compute_stats, load_stats, normalization_from_stats, save_stats
from explora_geo.errors import ExploraGeoError

BANDS = ["B02", "B03", "B04"]


def test_one_whole_image_patch_gives_numpy_statistics(tmp_path: Path) -> None:
    data = smooth((3, 48, 48), 8)
    data[:, :10, :] = 0  # nodata rows are left out
    path = write_tif(tmp_path / "img.tif", data, descriptions=BANDS, nodata=0,
                     tags={"BOA_ADD_OFFSET": "-1000"})
    stats = compute_stats(path, bands=["B04", "B02"], patch_size=48, num_patches=1, progress=False)
    valid = data[[2, 0], 10:, :].reshape(2, -1).astype(np.float64) - 1000
    assert stats["bands"] == ["B04", "B02"] and stats["pixels"] == 38 * 48 and stats["dn_offset"] == 1000
    np.testing.assert_allclose(stats["mean"], valid.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], valid.std(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["min"], valid.min(axis=1))
    expected = np.percentile(valid, PERCENTILES, axis=1)
    for p, row in zip(PERCENTILES, expected, strict=True):
        np.testing.assert_allclose(stats["percentiles"][f"p{p:g}"], row)
    norm = normalization_from_stats(stats, "meanstd")
    assert norm.offset == (1000.0, 1000.0)
    scaled = norm(data[[2, 0], 10:, :].astype(np.float64))
    np.testing.assert_allclose(scaled.reshape(2, -1).mean(axis=1), 0.0, atol=1e-9)


def test_same_seed_same_statistics_and_file_round_trip(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "img.tif", smooth((3, 96, 96), 9), descriptions=BANDS)
    a = compute_stats(path, bands=BANDS, patch_size=32, num_patches=6, seed=3, progress=False)
    b = compute_stats(path, bands=BANDS, patch_size=32, num_patches=6, seed=3, progress=False)
    c = compute_stats(path, bands=BANDS, patch_size=32, num_patches=6, seed=4, progress=False)
    assert a == b and a["mean"] != c["mean"]
    out = save_stats(a, tmp_path / "out" / "s.json")
    assert load_stats(out) == a
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ExploraGeoError, match="not an explora-geo statistics file"):
        load_stats(tmp_path / "bad.json")
    with pytest.raises(ExploraGeoError, match="does not exist"):
        load_stats(tmp_path / "none.json")
    with pytest.raises(ExploraGeoError, match="not 'reflectance'"):
        normalization_from_stats(a, "reflectance")

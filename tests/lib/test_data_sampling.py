"""PretrainDataModule: determinism, workers, nodata rejection/fill, ROI, resume, normalisation, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data_nodata import smooth, write_tif

from explora_geo.data import PretrainDataModule
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization

BANDS = ["B02", "B03", "B04"]


@pytest.fixture()
def half_nodata(tmp_path: Path) -> Path:
    """One 3-band file whose left 60 % is nodata (0 in all bands)."""
    data = smooth((3, 128, 160), 3)
    data[:, :, :96] = 0
    return write_tif(tmp_path / "half" / "h.tif", data, descriptions=BANDS, nodata=0)


@pytest.fixture()
def plain(tmp_path: Path) -> Path:
    return write_tif(tmp_path / "plain" / "p.tif", smooth((3, 128, 128), 4), descriptions=BANDS)


def _dm(data: Any, **kwargs: Any) -> PretrainDataModule:
    args: dict[str, Any] = dict(bands=BANDS, patch_size=32, batch_size=4, samples_per_epoch=12,
                                normalization=None)
    args.update(kwargs)
    return PretrainDataModule(data, **args)


def _epoch(dm: PretrainDataModule, epoch: int = 0) -> dict[str, torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_same_seed_same_patches_with_or_without_workers(plain: Path) -> None:
    a = _epoch(_dm(plain, seed=1))
    b = _epoch(_dm(plain, seed=1, num_workers=2))
    c = _epoch(_dm(plain, seed=2))
    assert a["image"].shape == (12, 3, 32, 32) and a["image"].dtype == torch.float32
    assert a["valid_mask"].shape == (12, 32, 32) and a["valid_mask"].dtype == torch.bool
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    assert not torch.equal(a["image"], c["image"])
    next_epoch = _epoch(_dm(plain, seed=1), epoch=1)
    assert not torch.equal(a["image"], next_epoch["image"])
    assert next_epoch["index"][:, 0].eq(1).all()


def test_nodata_patches_are_rejected_counted_and_filled(half_nodata: Path) -> None:
    dm = _dm(half_nodata, max_nodata_fraction=0.1, samples_per_epoch=16)
    out = _epoch(dm)
    missing = 1 - out["valid_mask"].float().mean(dim=(1, 2))
    assert (missing <= 0.1).all()
    assert dm.rejected_count == int(out["rejected"].sum()) > 0
    assert f"rejected patches so far: {dm.rejected_count}" in dm.describe()
    # some accepted patches straddle the edge: their missing pixels hold the band mean of the valid ones
    k = int(torch.argmax(missing))
    assert missing[k] > 0
    image, valid = out["image"][k], out["valid_mask"][k]
    for band in image:
        assert torch.allclose(band[~valid], band[valid].mean().expand(int((~valid).sum())), atol=0.5)
    assert (image[:, ~valid] > 0).all()


def test_all_nodata_patch_too_large_and_roi_outside_are_clear_errors(tmp_path: Path, plain: Path) -> None:
    empty = write_tif(tmp_path / "zero" / "z.tif", np.zeros((3, 64, 64), np.uint16), descriptions=BANDS, nodata=0)
    with pytest.raises(ExploraGeoError, match="all nodata"):
        _dm(empty).setup()
    with pytest.raises(ExploraGeoError, match="patch size 512 px is larger than every input"):
        _dm(plain, patch_size=512).setup()
    roi = _roi(tmp_path / "far.gpkg", (10.0, 40.0, 10.1, 40.1), "EPSG:4326")
    with pytest.raises(ExploraGeoError, match="does not overlap"):
        _dm(plain, roi=str(roi)).setup()
    with pytest.raises(ExploraGeoError, match="missing.gpkg does not exist"):
        _dm(plain, roi=str(tmp_path / "missing.gpkg")).setup()


def _roi(path: Path, box: tuple[float, float, float, float], crs: str) -> Path:
    import geopandas as gpd
    import shapely

    gpd.GeoDataFrame(geometry=[shapely.box(*box)], crs=crs).to_file(path)
    return path


def test_roi_in_another_crs_restricts_patch_centres(tmp_path: Path, plain: Path) -> None:
    import pyproj

    # the file's top-left is (300000, 5800000) in EPSG:32633, 10 m pixels: ROI = pixels cols 64..128, rows 0..64
    box = (300640.0, 5799360.0, 301280.0, 5800000.0)
    to_wgs = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    (x0, y0), (x1, y1) = to_wgs.transform(box[0], box[1]), to_wgs.transform(box[2], box[3])
    roi = _roi(tmp_path / "roi.gpkg", (x0, y0, x1, y1), "EPSG:4326")
    dm = _dm(plain, roi=str(roi), samples_per_epoch=20)
    dm.setup()
    assert dm.dataset is not None
    for i in range(20):
        window, *_ = dm.dataset.draw(0, i)
        centre_col, centre_row = window.col + 16, window.row + 16
        assert 63 <= centre_col <= 129 and centre_row <= 65


def test_resume_skips_consumed_samples(plain: Path) -> None:
    full = _epoch(_dm(plain, seed=4))
    first = _dm(plain, seed=4)
    loader = first.train_dataloader()
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(2)]  # 8 of 12 samples
    state = first.state_dict()
    assert state["epoch"] == 0 and state["next_index"] == 8
    resumed = _dm(plain, seed=4)
    resumed.load_state_dict(state)
    rest = resumed.train_dataloader()
    assert rest.sampler.remaining() == 4 and len(rest.sampler) == 12
    tail = torch.cat([b["image"] for b in rest])
    torch.testing.assert_close(torch.cat([b["image"] for b in consumed] + [tail]), full["image"], rtol=0, atol=0)
    assert rest.sampler.remaining() == 12  # the resume point served one iteration
    assert len(list(rest)) == 3  # iterating epoch 0 again (no set_epoch) yields it whole
    with pytest.raises(ExploraGeoError, match="seed"):
        _dm(plain, seed=5).load_state_dict(state)


def test_normalisation_and_l2a_offset(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "l2a" / "x.tif", smooth((3, 64, 64), 6), descriptions=BANDS,
                     tags={"BOA_ADD_OFFSET": "-1000"})
    raw = _epoch(_dm(path, samples_per_epoch=4, dn_offset=0))["image"]
    norm = Normalization("reflectance", tuple(BANDS), divide=10000.0)
    scaled = _epoch(_dm(path, samples_per_epoch=4, normalization=norm))["image"]
    torch.testing.assert_close(scaled, (raw - 1000) / 10000)
    reordered = _epoch(_dm(path, samples_per_epoch=4, bands=["B04", "B02"], normalization=norm))["image"]
    torch.testing.assert_close(reordered, scaled[:, [2, 0]])


def test_ranks_share_an_epoch_and_resume_together() -> None:
    from explora_geo.data.sampling import EpochSampler

    position: dict[str, int] = {}
    ranks = [EpochSampler(10, position, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in ranks] == [5, 5]
    assert [i for _, i in ranks[0]] == [0, 2, 4, 6, 8] and [i for _, i in ranks[1]] == [1, 3, 5, 7, 9]
    # after 2 samples per rank, rank 1's last sample is 3: the global position is 4
    assert ranks[1].next_index(3) == 4 == ranks[0].next_index(2)
    position.update(epoch=0, next_index=4)
    assert [s.remaining() for s in ranks] == [3, 3]
    assert [i for _, i in ranks[0]] == [4, 6, 8]
    position.update(epoch=0, next_index=4)  # each rank's process has its own copy of the resume point
    assert [i for _, i in ranks[1]] == [5, 7, 9]
    assert list(EpochSampler(11, rank=0, world=3))[-1] == (0, 6)  # the tail (9, 10) is dropped
    with pytest.raises(ExploraGeoError, match="fewer than the 4 processes"):
        EpochSampler(3, rank=0, world=4)


def test_lightning_sets_epochs_and_checkpoints_the_position(plain: Path, tmp_path: Path) -> None:
    import lightning as L

    seen: list[tuple[int, int]] = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            seen.extend((int(e), int(i)) for e, i in batch["index"])
            return (batch["image"].mean() - self.w).pow(2)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(**kwargs: Any) -> L.Trainer:
        return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", **kwargs)

    dm = _dm(plain, samples_per_epoch=8)
    trainer(max_epochs=2).fit(Probe(), datamodule=dm)
    assert seen == [(e, i) for e in range(2) for i in range(8)]
    assert dm.state_dict()["epoch"] == 1 and dm.state_dict()["next_index"] == 8

    # a checkpoint after 2 of 3 batches of epoch 0; resuming from it reads the rest of epoch 0, then epoch 1
    from lightning.pytorch.callbacks import ModelCheckpoint

    every2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    L.Trainer(max_epochs=1, logger=False, callbacks=[every2], enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu").fit(
        Probe(), datamodule=_dm(plain))
    mid = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    seen.clear()
    resumed = _dm(plain)
    trainer(max_epochs=2).fit(Probe(), datamodule=resumed, ckpt_path=mid)
    assert seen == [(0, i) for i in range(8, 12)] + [(1, i) for i in range(12)]
    assert resumed.samples_seen == 24


def test_chips_exactly_one_patch_wide_are_sampled(tmp_path: Path) -> None:
    for k in range(3):
        write_tif(tmp_path / "chips" / f"c{k}.tif", smooth((3, 32, 32), k), descriptions=BANDS,
                  origin=(300000.0 + 1000 * k, 5800000.0))
    out = _epoch(_dm(tmp_path / "chips", samples_per_epoch=30))
    assert set(out["source"].tolist()) == {0, 1, 2}
    import rasterio

    with rasterio.open(tmp_path / "chips" / "c1.tif") as src:
        whole = torch.from_numpy(src.read().astype(np.float32))
    k = int(torch.nonzero(out["source"] == 1)[0])
    torch.testing.assert_close(out["image"][k], whole)

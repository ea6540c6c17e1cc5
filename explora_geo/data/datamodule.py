"""``PretrainDataModule``: random patches of a mosaic for self-supervised pre-training (Lightning).

Batches are dicts: ``image`` float32 ``[B, C, H, W]`` (normalised, bands in ``bands`` order, nodata filled),
``valid_mask`` bool ``[B, H, W]``, plus ``index`` int64 ``[B, 2]`` (epoch, sample), ``rejected`` int64 ``[B]``
(redraws each sample needed) and ``source`` int64 ``[B]`` (the unit it came from).

Determinism: sample ``i`` of epoch ``e`` depends only on ``(seed, e, i)``. Samples are visited in index order
(under DDP, rank ``r`` of ``w`` takes ``i = r, r + w, ...``), so the data position is ``(epoch, next index)``;
:meth:`PretrainDataModule.state_dict` stores it and a resumed run skips the samples already consumed (they are
not read).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from explora_geo.data.catalog import Catalog, DataSpec, build_catalog
from explora_geo.data.sampling import EpochSampler, PatchDataset, load_roi
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import Sensor

__all__ = ["PretrainDataModule"]


class _TrackedLoader(DataLoader):
    """A DataLoader that reports each batch to its data module in the main process (position, rejections).

    It is also resumable in Lightning's sense (``state_dict``/``load_state_dict``), delegating to the module,
    so a mid-epoch checkpoint resumes at the next sample.
    """

    module: Any = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if self.module is not None:
                self.module._observe(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict() if self.module is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.module is not None and state_dict:
            self.module.load_state_dict(state_dict)


class PretrainDataModule(L.LightningDataModule):
    """Random normalised patches of GeoTIFF mosaics or per-band scenes.

    Args:
        data: folder, glob, raster file or list of those.
        bands: band names of the model input, in order.
        sensor: preset naming the files' bands (and their aliases); ``None``: names from the files.
        patch_size: patch side in pixels.
        batch_size: patches per batch.
        num_workers: DataLoader worker processes (each opens its own file handles).
        samples_per_epoch: patches per epoch.
        normalization: scaling applied to every patch (``None``: digital numbers minus the DN offset).
        nodata: nodata value (default: the files' metadata, else 0).
        max_nodata_fraction: patches with more missing pixels are redrawn (0..1).
        roi: vector file restricting where patches are centred (any CRS).
        res, crs: the catalog's resolution (in the CRS's units) and CRS (defaults chosen and reported by
            :meth:`describe`); both readers cut every file on its own grid at that resolution in metres (a
            geographic file on its UTM zone's grid, see :func:`~explora_geo.data.catalog.build_catalog`).
        seed: base seed.
        fast: read with direct windowed reads (True) or through torchgeo datasets (False); both cut the same
            windows of each file's grid.
        band_names: names of the bands of multi-band files, in file order (when neither descriptions nor the
            sensor preset name them, e.g. EuroSAT's B8A-last order).
        dn_offset: ``"auto"`` (detect the Sentinel-2 L2A +1000 DN offset) or DN to subtract.
        max_open_files: files kept open per worker by the fast reader (default: a quarter of ``ulimit -n``,
            at most 256; least recently used closed first).
        holdout: fraction of every input's rows (its bottom) kept out of training; ``val_samples`` patches of
            it, the same ones at every validation, form :meth:`val_dataloader` (no training patch overlaps one).
        val_samples: held-out patches per validation (0: no validation).
    """

    def __init__(
        self,
        data: DataSpec,
        *,
        bands: Sequence[str],
        sensor: str | Sensor | None = "sentinel2",
        patch_size: int,
        batch_size: int,
        num_workers: int = 0,
        samples_per_epoch: int,
        normalization: Normalization | None,
        nodata: float | None = None,
        max_nodata_fraction: float = 0.5,
        roi: str | None = None,
        res: float | None = None,
        crs: Any = None,
        seed: int = 0,
        fast: bool = True,
        band_names: Sequence[str] | None = None,
        dn_offset: float | str = "auto",
        max_open_files: int | None = None,
        holdout: float = 0.0,
        val_samples: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= holdout < 1.0 or val_samples < 0 or (val_samples > 0) != (holdout > 0):
            raise ExploraGeoError(f"held-out fraction {holdout} / val_samples {val_samples}: give both (a "
                                  "fraction in (0, 1) and a positive count) or neither.")
        if batch_size < 1 or num_workers < 0:
            raise ExploraGeoError(f"batch_size {batch_size} / num_workers {num_workers} must be >= 1 / >= 0.")
        self.data = data
        self.bands = tuple(bands)
        self.sensor = sensor
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.samples_per_epoch = int(samples_per_epoch)
        self.normalization = normalization
        self.nodata = nodata
        self.max_nodata_fraction = float(max_nodata_fraction)
        self.roi = roi
        self.res = res
        self.crs = crs
        self.seed = int(seed)
        self.fast = fast
        self.band_names = band_names
        self.dn_offset = dn_offset
        self.max_open_files = max_open_files
        self.holdout = float(holdout)
        self.val_samples = int(val_samples)
        self.catalog: Catalog | None = None
        self.dataset: PatchDataset | None = None
        self.val_dataset: PatchDataset | None = None
        self.rejected_count = 0
        self.samples_seen = 0
        self._position: dict[str, int] = {}  # last consumed position, for state_dict
        self._resume: dict[str, int] = {}  # where the next iteration of that epoch starts (load_state_dict)
        self._sampler: EpochSampler | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Build the catalog and the patch dataset, and draw sample 0 once to validate the input."""
        if self.dataset is not None:
            return
        self.catalog = build_catalog(
            self.data, bands=self.bands, sensor=self.sensor, band_names=self.band_names, nodata=self.nodata,
            res=self.res, crs=self.crs, dn_offset=self.dn_offset,
        )
        roi = load_roi(self.roi) if self.roi is not None else None
        common = dict(patch_size=self.patch_size, normalization=self.normalization, roi=roi, fast=self.fast,
                      max_nodata_fraction=self.max_nodata_fraction, max_open_files=self.max_open_files)
        cut = 1.0 - self.holdout
        self.dataset = PatchDataset(self.catalog, length=self.samples_per_epoch, seed=self.seed,
                                    rows=(0.0, cut) if self.holdout else None, **common)
        if self.holdout:
            self.val_dataset = PatchDataset(self.catalog, length=self.val_samples, seed=self.seed + 7919,
                                            rows=(cut, 1.0), **common)
        for dataset in (self.dataset, self.val_dataset):
            if dataset is None:
                continue
            try:
                dataset.draw(0, 0)  # raises a clear error for all-nodata data before workers start
            finally:
                dataset.close()  # no handle may be inherited by the workers

    def train_dataloader(self) -> DataLoader:
        """Batches of ``samples_per_epoch`` patches; see the module docstring for the keys."""
        self.setup()
        assert self.dataset is not None
        self._sampler = EpochSampler(self.samples_per_epoch, self._resume)
        loader = _TrackedLoader(
            self.dataset, batch_size=self.batch_size, sampler=self._sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=False,
        )
        loader.module = self
        return loader

    def val_dataloader(self) -> DataLoader | list[Any]:
        """The ``val_samples`` held-out patches (epoch 0, the same at every validation); none without a
        hold-out."""
        self.setup()
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    # ------------------------------------------------------------------ bookkeeping
    def _observe(self, batch: dict[str, Any]) -> None:
        epoch, last = (int(v) for v in batch["index"][-1])
        step = self._sampler.next_index(last) if self._sampler is not None else last + 1
        self._position.update(epoch=epoch, next_index=step)
        self.rejected_count += int(batch["rejected"].sum())
        self.samples_seen += int(batch["index"].shape[0])

    def state_dict(self) -> dict[str, Any]:
        """Data position (epoch, next sample index), seed and counters, for Lightning checkpoints."""
        return {"epoch": self._position.get("epoch", 0), "next_index": self._position.get("next_index", 0),
                "seed": self.seed, "rejected_count": self.rejected_count, "samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the stored position: the stored epoch skips the samples already consumed."""
        if int(state_dict.get("seed", self.seed)) != self.seed:
            raise ExploraGeoError(
                f"checkpoint data seed {state_dict['seed']} differs from seed {self.seed}; "
                "resume with the same seed."
            )
        position = {"epoch": int(state_dict["epoch"]), "next_index": int(state_dict["next_index"])}
        self._position.clear()
        self._position.update(position)
        self._resume.clear()
        self._resume.update(position)
        self.rejected_count = int(state_dict.get("rejected_count", 0))
        self.samples_seen = int(state_dict.get("samples_seen", 0))

    def describe(self) -> str:
        """Files, CRS, resolution, bands, nodata, offset, reader and rejections so far (for logs)."""
        self.setup()
        assert self.catalog is not None and self.dataset is not None
        if self.fast:
            most = self.dataset.reader.pool.max_open
            reader = f"fast (windowed reads on each unit's grid, at most {most} files open per process)"
        else:
            reader = "torchgeo (one dataset per CRS, same windows)"
        roi = f"; roi: {Path(self.roi).name}" if self.roi else ""
        if self.holdout:
            roi += f"; bottom {self.holdout:.0%} of rows held out ({self.val_samples} validation patches)"
        return (f"{self.catalog.describe()}\nreader: {reader}; patch {self.patch_size} px; "
                f"{self.samples_per_epoch} samples/epoch{roi}\n"
                f"rejected patches so far: {self.rejected_count} of "
                f"{self.samples_seen + self.rejected_count} drawn "
                f"(max nodata fraction {self.max_nodata_fraction:g})")

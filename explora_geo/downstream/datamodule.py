"""A LightningDataModule over a chip folder, for ``torchgeo fit`` and our own loops.

Bands, normalisation and input size come from a backbone sidecar (``backbone=``), so the data are fed
exactly as the backbone expects; without a backbone, give ``bands`` (and optionally ``normalization``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchgeo.datamodules import BaseDataModule

from explora_geo.downstream.labeled import ChipDataset, ChipIndex, scan_chip_folder, stratified_split
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import get_sensor

__all__ = ["ChipFolderDataModule"]


def _unchanged(batch: dict[str, Any]) -> dict[str, Any]:
    """Batch transform of the datamodule: none (chips are scaled by the sidecar normalisation already)."""
    return batch


class ChipFolderDataModule(BaseDataModule):
    """Train/val/test loaders over a chip folder (one sub-folder per class), split seeded and stratified.

    Args:
        root: the chip folder.
        backbone: a backbone file (``.safetensors``/``.json``) whose sidecar gives the bands (model order),
            the normalisation and the input size.
        bands: band names (or a sensor preset, whose model bands are used) when no backbone is given.
        normalization: a :class:`Normalization` dict for ``bands`` when no backbone is given (default: none).
        file_bands: how the files' bands are named when they carry no descriptions (``"eurosat"``, a sensor
            preset, or a list); see :func:`explora_geo.downstream.labeled.resolve_file_bands`.
        img_size: resize chips to this many pixels (default: the backbone's ``img_size``).
        split: train/val/test fractions.
        seed: split seed.
        batch_size, num_workers: DataLoader settings.

    It is a torchgeo ``BaseDataModule`` (what ``torchgeo fit`` accepts as ``data.class_path``); its batch
    transform is the identity, because :class:`ChipDataset` already applies the backbone's normalisation.
    """

    mean = torch.tensor(0.0)
    std = torch.tensor(1.0)

    def __init__(
        self,
        root: str,
        backbone: str | None = None,
        bands: str | list[str] | None = None,
        normalization: dict[str, Any] | None = None,
        file_bands: str | list[str] | None = None,
        img_size: int | None = None,
        split: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(ChipDataset, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.aug = _unchanged
        if backbone is not None:
            from explora_geo.checkpoint import read_sidecar
            from explora_geo.downstream.backbones import sidecar_normalization

            sidecar = read_sidecar(backbone)
            self.bands = list(sidecar["bands"])
            self.normalization = sidecar_normalization(sidecar)
            size = sidecar["img_size"]
            img_size = img_size or (size if isinstance(size, int) else int(size[0]))
        elif bands is not None:
            self.bands = get_sensor(bands).model_bands if isinstance(bands, str) else list(bands)
            self.normalization = Normalization.from_dict(normalization) if normalization else None
        else:
            raise ExploraGeoError("ChipFolderDataModule needs a backbone file (backbone=...) or bands=...; "
                                  "pass the backbone you fine-tune.")
        self.img_size = img_size
        self.index: ChipIndex | None = None
        self.splits: dict[str, Any] = {}

    @property
    def classes(self) -> list[str]:
        """Class names (folder names, sorted)."""
        if self.index is None:
            self.index = scan_chip_folder(self.hparams["root"])
        return list(self.index.classes)

    def setup(self, stage: str | None = None) -> None:
        """Index the folder and split it (idempotent)."""
        if self.splits:
            return
        if self.index is None:
            self.index = scan_chip_folder(self.hparams["root"])
        train, val, test = stratified_split(self.index.labels, self.hparams["split"], seed=self.hparams["seed"])
        self.splits = {
            name: ChipDataset(self.index, idx, bands=self.bands, file_bands=self.hparams["file_bands"],
                              normalization=self.normalization, img_size=self.img_size)
            for name, idx in (("train", train), ("val", val), ("test", test))
        }
        self.train_dataset, self.val_dataset = self.splits["train"], self.splits["val"]
        self.test_dataset = self.predict_dataset = self.splits["test"]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[name], batch_size=self.hparams["batch_size"], shuffle=shuffle,
                          num_workers=self.hparams["num_workers"], persistent_workers=False)

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", False)

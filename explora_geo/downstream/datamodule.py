"""LightningDataModules over chip folders and mask folders, for ``torchgeo fit`` and our own loops.

Bands, normalisation and input size come from a backbone sidecar (``backbone=``), so the data are fed
exactly as the backbone expects; without a backbone, give ``bands`` (and optionally ``normalization``).
Both are torchgeo ``BaseDataModule`` subclasses (what ``torchgeo fit`` accepts as ``data.class_path``) whose
batch transform is the identity: the datasets already apply the backbone's normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchgeo.datamodules import BaseDataModule

from explora_geo.downstream.labeled import ChipDataset, ChipIndex, scan_chip_folder, stratified_split
from explora_geo.downstream.masks import (
    MaskDataset,
    MaskIndex,
    random_split,
    scan_mask_folder,
    vector_labels_to_masks,
)
from explora_geo.downstream.mosaic import vector_labels_to_chips
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import get_sensor

__all__ = ["ChipFolderDataModule", "MaskFolderDataModule"]


def _unchanged(batch: dict[str, Any]) -> dict[str, Any]:
    """Batch transform of the datamodules: none (chips are scaled by the sidecar normalisation already)."""
    return batch


class _SplitDataModule(BaseDataModule):
    """Bands / normalisation / size from a backbone sidecar or from arguments; train/val/test loaders."""

    mean = torch.tensor(0.0)
    std = torch.tensor(1.0)

    def __init__(self, dataset_class: type, *, backbone: str | None, bands: str | list[str] | None,
                 normalization: dict[str, Any] | None, img_size: int | None, batch_size: int,
                 num_workers: int) -> None:
        super().__init__(dataset_class, batch_size=batch_size, num_workers=num_workers)
        self.aug = _unchanged
        if backbone is not None:
            from explora_geo.checkpoint import read_sidecar
            from explora_geo.downstream.backbones import sidecar_img_size, sidecar_normalization

            sidecar = read_sidecar(backbone)
            self.bands = list(sidecar["bands"])
            self.normalization = sidecar_normalization(sidecar)
            img_size = img_size or sidecar_img_size(sidecar)
        elif bands is not None:
            self.bands = get_sensor(bands).model_bands if isinstance(bands, str) else list(bands)
            self.normalization = Normalization.from_dict(normalization) if normalization else None
        else:
            raise ExploraGeoError(f"{type(self).__name__} needs a backbone file (backbone=...) or bands=...; "
                                  "pass the backbone you fine-tune.")
        self.img_size = img_size
        self.splits: dict[str, Dataset] = {}
        self.index: Any = None

    # What a subclass says about its folder: what it is made of, whether it is there, how to make it from
    # vector labels, how to index it, how to split the index.
    made_of: str

    def _folder_exists(self, root: Path) -> bool:
        raise NotImplementedError

    def _make_folder(self, hp: Any) -> None:
        raise NotImplementedError

    def _scan(self, root: str) -> Any:
        raise NotImplementedError

    def _split(self, index: Any) -> Sequence[Any]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Make the folder from ``vector`` + ``raster`` when it does not exist yet."""
        hp = self.hparams
        if self._folder_exists(Path(hp["root"])) or not (hp["vector"] and hp["raster"]):
            return
        if not hp["class_column"]:
            raise ExploraGeoError(f"making {self.made_of} from vector labels needs class_column=<attribute name>.")
        self._make_folder(hp)

    def _load_index(self) -> Any:
        if self.index is None:
            self.prepare_data()
            self.index = self._scan(self.hparams["root"])
        return self.index

    @property
    def classes(self) -> list[str]:
        """Class names, sorted: the class folder names of a chip folder; for a mask folder, mask value ``k + 1``
        is ``classes[k]`` and 0 is unlabelled."""
        return list(self._load_index().classes)

    def _make_splits(self) -> dict[str, Dataset]:
        index = self._load_index()
        return {name: self.dataset_class(index, idx, bands=self.bands, file_bands=self.hparams["file_bands"],
                                         normalization=self.normalization, img_size=self.img_size)
                for name, idx in zip(("train", "val", "test"), self._split(index), strict=True)}

    def setup(self, stage: str | None = None) -> None:
        """Index the folder and split it (idempotent)."""
        if not self.splits:
            self.splits = self._make_splits()
            self.train_dataset, self.val_dataset = self.splits["train"], self.splits["val"]
            self.test_dataset = self.predict_dataset = self.splits["test"]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[name], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test", False)


class ChipFolderDataModule(_SplitDataModule):
    """Train/val/test loaders over a chip folder (one sub-folder per class), split seeded and stratified.

    When ``root`` does not exist yet and ``vector`` + ``raster`` are given, the chip folder is first made
    from them (:func:`explora_geo.downstream.mosaic.vector_labels_to_chips`: one chip per point/polygon).

    Args:
        root: the chip folder.
        vector, raster, class_column, chip_size, skip_outside: how to make it when missing.
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
    """

    made_of = "chips"

    def __init__(
        self,
        root: str,
        backbone: str | None = None,
        vector: str | None = None,
        raster: str | None = None,
        class_column: str | None = None,
        chip_size: int = 64,
        skip_outside: bool = False,
        bands: str | list[str] | None = None,
        normalization: dict[str, Any] | None = None,
        file_bands: str | list[str] | None = None,
        img_size: int | None = None,
        split: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(ChipDataset, backbone=backbone, bands=bands, normalization=normalization,
                         img_size=img_size, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()

    def _folder_exists(self, root: Path) -> bool:
        return root.exists()

    def _make_folder(self, hp: Any) -> None:
        vector_labels_to_chips(hp["vector"], hp["raster"], hp["root"], class_column=hp["class_column"],
                               chip_size=hp["chip_size"], skip_outside=hp["skip_outside"])

    def _scan(self, root: str) -> ChipIndex:
        return scan_chip_folder(root)

    def _split(self, index: ChipIndex) -> Sequence[Any]:
        return stratified_split(index.labels, self.hparams["split"], seed=self.hparams["seed"])


class MaskFolderDataModule(_SplitDataModule):
    """Image/mask loaders over a mask folder (``images/``, ``masks/``, ``classes.json``), split seeded.

    When ``root`` has no ``classes.json`` yet and ``vector`` + ``raster`` are given, the folder is first
    made from them (:func:`explora_geo.downstream.masks.vector_labels_to_masks`), so a ``torchgeo fit``
    config can start from polygons and a mosaic.

    Args:
        root: the mask folder.
        vector, raster, class_column, chip_size, min_labelled: how to make it when missing.
        backbone, bands, normalization, file_bands, img_size, split, seed, batch_size, num_workers: as in
            :class:`ChipFolderDataModule`.
    """

    made_of = "masks"

    def __init__(
        self,
        root: str,
        backbone: str | None = None,
        vector: str | None = None,
        raster: str | None = None,
        class_column: str | None = None,
        chip_size: int = 64,
        min_labelled: float = 0.05,
        bands: str | list[str] | None = None,
        normalization: dict[str, Any] | None = None,
        file_bands: str | list[str] | None = None,
        img_size: int | None = None,
        split: Sequence[float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__(MaskDataset, backbone=backbone, bands=bands, normalization=normalization,
                         img_size=img_size, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()

    def _folder_exists(self, root: Path) -> bool:
        return (root / "classes.json").is_file()

    def _make_folder(self, hp: Any) -> None:
        vector_labels_to_masks(hp["vector"], hp["raster"], hp["root"], class_column=hp["class_column"],
                               chip_size=hp["chip_size"], min_labelled=hp["min_labelled"])

    def _scan(self, root: str) -> MaskIndex:
        return scan_mask_folder(root)

    def _split(self, index: MaskIndex) -> Sequence[Any]:
        return random_split(len(index), self.hparams["split"], seed=self.hparams["seed"])

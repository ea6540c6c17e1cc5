"""Labelled chips for downstream tasks: chip folders (bands picked by name) and seeded stratified splits.

A *chip folder* has the EuroSAT layout: one sub-folder per class, each holding GeoTIFF chips::

    root/AnnualCrop/AnnualCrop_1.tif
    root/Forest/Forest_7.tif
    ...

The band order of the files is free: the bands a model needs are picked BY NAME
(:func:`explora_geo.sensors.select_bands`). The names of the file's bands come from the GeoTIFF band
descriptions when present, else from a ``file_bands`` specification (a layout name such as ``"eurosat"``,
a sensor preset, or an explicit list); see :func:`resolve_file_bands`. Chip folders can be made from vector
labels over a mosaic with :func:`explora_geo.downstream.mosaic.vector_labels_to_chips`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import SENSORS, select_bands

__all__ = [
    "EUROSAT_FILE_BANDS",
    "FILE_LAYOUTS",
    "ChipIndex",
    "ChipDataset",
    "scan_chip_folder",
    "resolve_file_bands",
    "read_band_names",
    "stratified_split",
    "check_split_fractions",
    "split_sizes",
    "BandChipDataset",
    "read_chip",
]

#: Band order of the EuroSAT-MS GeoTIFFs (B8A is LAST, after B12).
EUROSAT_FILE_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)
#: Named band layouts of files without band descriptions (sensor presets are accepted too).
FILE_LAYOUTS: dict[str, tuple[str, ...]] = {"eurosat": EUROSAT_FILE_BANDS}

CHIP_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")


@dataclass(frozen=True)
class ChipIndex:
    """The chips of a chip folder.

    Args:
        paths: one GeoTIFF per chip.
        labels: class index of each chip (into ``classes``).
        classes: class names, sorted (the folder names).
    """

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def scan_chip_folder(root: str | os.PathLike[str], *, min_classes: int = 2) -> ChipIndex:
    """Index a folder of chips, one sub-folder per class (EuroSAT layout).

    Raises:
        ExploraGeoError: when ``root`` is missing, has no class folders, a class folder holds no GeoTIFF, or
            there are fewer than ``min_classes`` classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise ExploraGeoError(f"labelled data folder {root} does not exist; pass a folder with one sub-folder "
                              "of GeoTIFF chips per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ExploraGeoError(f"{root} has no class sub-folders; put the chips of each class in "
                              f"{root}/<class name>/*.tif.")
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        chips = sorted(p for p in folder.iterdir() if p.suffix.lower() in CHIP_SUFFIXES and p.is_file())
        if not chips:
            raise ExploraGeoError(f"class folder {folder} holds no GeoTIFF chips (*.tif); add chips or remove "
                                  "the folder.")
        paths.extend(chips)
        labels.extend([label] * len(chips))
    if len(class_dirs) < min_classes:
        raise ExploraGeoError(f"{root} has a single class ({class_dirs[0].name}); classification needs at least "
                              f"{min_classes} class folders.")
    return ChipIndex(tuple(paths), tuple(labels), tuple(p.name for p in class_dirs))


def read_band_names(path: str | os.PathLike[str]) -> list[str | None]:
    """Band descriptions of a raster file (``None`` for a band without one)."""
    import rasterio

    with rasterio.open(path) as src:
        return list(src.descriptions)


def resolve_file_bands(spec: str | Sequence[str] | None, path: str | os.PathLike[str]) -> list[str]:
    """Names of the bands of ``path``, in file order.

    Args:
        spec: ``None``: the file's band descriptions (every band must have one); a layout name in
            :data:`FILE_LAYOUTS` (``"eurosat"``); a sensor preset name (its product band order, e.g.
            ``"sentinel2"``); a comma-separated string or a list of band names.
        path: the file (used for descriptions and to check the band count).

    Raises:
        ExploraGeoError: when the file's bands have no names and no ``spec`` was given, or when the number of
            names does not match the file's band count.
    """
    described = read_band_names(path)
    if spec is None:
        if any(d is None or not d.strip() for d in described):
            raise ExploraGeoError(
                f"{path} has bands without names (GeoTIFF descriptions); say which bands the files hold, e.g. "
                f"--file-bands eurosat, --file-bands sentinel2 or --file-bands B02,B03,B04."
            )
        return [str(d) for d in described]
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key in FILE_LAYOUTS:
            names = list(FILE_LAYOUTS[key])
        elif key in SENSORS:
            names = SENSORS[key].band_names
        else:
            names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if len(names) != len(described):
        raise ExploraGeoError(
            f"{path} has {len(described)} bands but the band list names {len(names)} ({', '.join(names)}); "
            f"give one name per band of the file, in file order."
        )
    return names


def check_split_fractions(fractions: Sequence[float]) -> None:
    """Raise unless ``fractions`` are three non-negative numbers (train, val, test) summing to 1."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ExploraGeoError(f"split fractions {tuple(fractions)} must be three non-negative numbers "
                              "(train, val, test) summing to 1.")


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` of ``n`` items cut by ``fractions``: val and test get at least one item
    when their fraction is positive, train the rest (which may be < 1: the caller says what is too few)."""
    n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    return n - n_val - n_test, n_val, n_test


def stratified_split(
    labels: Sequence[int],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified train/val/test split.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut by ``fractions`` (train, val, test;
    summing to 1). A split with a positive fraction gets at least one chip of every class.

    Returns:
        ``(train, val, test)`` index arrays (sorted) into ``labels``.

    Raises:
        ExploraGeoError: for bad fractions, a single class, or a class too small to appear in every split.
    """
    check_split_fractions(fractions)
    if fractions[0] <= 0:
        raise ExploraGeoError("the train fraction of the split must be positive.")
    y = np.asarray(labels, dtype=np.int64)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ExploraGeoError(f"all {len(y)} labelled samples are of one class; a split for classification "
                              "needs at least two classes.")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        n_train, n_val, _ = split_sizes(n, fractions)
        if n_train < 1:
            raise ExploraGeoError(f"class {int(c)} has only {n} samples, too few for a train/val/test split "
                                  f"{tuple(fractions)}; add samples of that class or drop it.")
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train: n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


class BandChipDataset(Dataset):
    """Chips read with the bands a model needs, picked by name: what :class:`ChipDataset` and
    :class:`explora_geo.downstream.masks.MaskDataset` share.

    Subclasses say where item ``k``'s image lies (:meth:`_image_path`) and what a sample holds.

    Args:
        index: the chips.
        indices: which chips of ``index`` this dataset serves (all when ``None``).
        bands: band names the model consumes, in model order.
        file_bands: how to name the files' bands; see :func:`resolve_file_bands`.
        normalization: scaling for ``bands`` (``None``: raw digital numbers as float).
        img_size: output height/width in pixels (``None``: the chip's own size).
    """

    def __init__(
        self,
        index: Any,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        bands: Sequence[str],
        file_bands: str | Sequence[str] | None = None,
        normalization: Normalization | None = None,
        img_size: int | None = None,
    ) -> None:
        self.index = index
        self.indices = np.arange(len(index)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.bands = list(bands)
        self.file_bands = file_bands
        self.normalization = normalization.select(self.bands) if normalization is not None else None
        self.img_size = img_size
        if len(self.indices):
            self._band_idx(self._image_path(int(self.indices[0])))  # fail early on a band mismatch

    def _image_path(self, k: int) -> Path:
        raise NotImplementedError

    def _band_idx(self, path: Path) -> list[int]:
        names = resolve_file_bands(self.file_bands, path)
        return select_bands(names, self.bands, source=str(path))

    def _image(self, k: int) -> torch.Tensor:
        """Image of chip ``k`` of the index: float32 ``[C, H, W]``, bands picked, scaled and resized."""
        path = self._image_path(k)
        return read_chip(path, self._band_idx(path), self.normalization, self.img_size)

    def __len__(self) -> int:
        return len(self.indices)


class ChipDataset(BandChipDataset):
    """Chips of a :class:`ChipIndex` as model inputs.

    A sample is ``{"image": float32 [C, H, W], "label": int64 []}`` with C = ``len(bands)`` in the order of
    ``bands`` (the model's band names), scaled by ``normalization`` and resized to ``img_size`` (bilinear)
    when given. Files are opened lazily per item (safe with DataLoader workers). Arguments: see
    :class:`BandChipDataset`.
    """

    index: ChipIndex

    def _image_path(self, k: int) -> Path:
        return self.index.paths[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = int(self.indices[i])
        return {"image": self._image(k), "label": torch.tensor(self.index.labels[k], dtype=torch.long)}


def read_chip(path: str | os.PathLike[str], band_idx: Sequence[int], normalization: Normalization | None = None,
              img_size: int | None = None) -> torch.Tensor:
    """Bands ``band_idx`` (0-based) of a chip as float32 ``[C, H, W]``, scaled by ``normalization`` and resized
    (bilinear) to ``img_size`` x ``img_size`` when given."""
    import rasterio

    with rasterio.open(path) as src:
        data = src.read([j + 1 for j in band_idx]).astype(np.float32)
    image = torch.from_numpy(data)
    if normalization is not None:
        image = normalization(image)
    if img_size is not None and tuple(image.shape[-2:]) != (img_size, img_size):
        image = torch.nn.functional.interpolate(image[None], size=(img_size, img_size), mode="bilinear",
                                                align_corners=False)[0]
    return image.float()

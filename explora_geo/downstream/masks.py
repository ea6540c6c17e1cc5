"""Segmentation chips: polygons with a class column, rasterised over a mosaic into image/mask chip pairs.

A *mask folder* holds ``images/<i>.tif`` (bands with names), ``masks/<i>.tif`` (one uint8 band: 0 =
unlabelled, ``k + 1`` = class ``k``) and ``classes.json`` (``{"classes": [...], "unlabelled": 0}``). Train a
segmentation task on it with ``num_classes = len(classes) + 1`` and ``ignore_index = 0``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explora_geo.atomic import write_text_atomic
from explora_geo.downstream.labeled import BandChipDataset, check_split_fractions, split_sizes
from explora_geo.downstream.mosaic import (
    class_folder_name,
    labelled_mosaic,
    open_bands,
    read_window,
    write_geotiff,
)
from explora_geo.errors import ExploraGeoError

__all__ = ["MaskIndex", "MaskDataset", "scan_mask_folder", "vector_labels_to_masks", "random_split"]

UNLABELLED = 0


@dataclass(frozen=True)
class MaskIndex:
    """Image/mask chip pairs and the class names (mask value ``k + 1`` is ``classes[k]``)."""

    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def scan_mask_folder(root: str | os.PathLike[str]) -> MaskIndex:
    """Index a mask folder (see the module docstring).

    Raises:
        ExploraGeoError: missing folder / ``classes.json``, an image without its mask, no chips.
    """
    root = Path(root)
    meta = root / "classes.json"
    if not meta.is_file():
        raise ExploraGeoError(f"{meta} does not exist; create the mask folder with vector_labels_to_masks "
                              "(or give the datamodule vector= and raster=).")
    classes = tuple(json.loads(meta.read_text())["classes"])
    images = tuple(sorted((root / "images").glob("*.tif")))
    if not images:
        raise ExploraGeoError(f"{root / 'images'} holds no GeoTIFF chips.")
    masks = tuple(root / "masks" / p.name for p in images)
    missing = [m for m in masks if not m.is_file()]
    if missing:
        raise ExploraGeoError(f"mask {missing[0]} is missing for image {missing[0].name} "
                              f"({len(missing)} missing); "
                              "every image needs a mask of the same name.")
    return MaskIndex(images, masks, classes)


def random_split(n: int, fractions: Sequence[float] = (0.6, 0.2, 0.2), *, seed: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test split of ``n`` items (every split with a positive fraction gets one item).

    Raises:
        ExploraGeoError: bad fractions or too few items.
    """
    check_split_fractions(fractions)
    n_train, n_val, _ = split_sizes(n, fractions)
    if n_train < 1:
        raise ExploraGeoError(f"{n} chips are too few for a train/val/test split {tuple(fractions)}; make more "
                              "chips (smaller --chip-size or stride) or change the split.")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]), np.sort(order[n_train + n_val:])


class MaskDataset(BandChipDataset):
    """Image/mask pairs as ``{"image": float32 [C, H, W], "mask": int64 [H, W]}``.

    Bands are picked by name in ``bands`` order, scaled by ``normalization``; image and mask are resized to
    ``img_size`` (bilinear / nearest) when given. Arguments: see
    :class:`explora_geo.downstream.labeled.BandChipDataset`.
    """

    index: MaskIndex

    def _image_path(self, k: int) -> Path:
        return self.index.images[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import rasterio

        k = int(self.indices[i])
        image = self._image(k)
        with rasterio.open(self.index.masks[k]) as src:
            mask = torch.from_numpy(src.read(1).astype(np.int64))
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            mask = torch.nn.functional.interpolate(mask[None, None].float(), size=image.shape[-2:],
                                                   mode="nearest")[0, 0].long()
        return {"image": image, "mask": mask}


def vector_labels_to_masks(
    vector: str | os.PathLike[str],
    raster: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    class_column: str,
    chip_size: int = 64,
    stride: int | None = None,
    res: float | None = None,
    bands: Sequence[str] | None = None,
    file_bands: str | Sequence[str] | None = None,
    layer: str | None = None,
    min_labelled: float = 0.05,
) -> MaskIndex:
    """Tile a mosaic into ``chip_size`` chips (step ``stride``, default ``chip_size``) and rasterise the
    polygons of ``vector`` (any CRS, reprojected to the raster's) into a mask per chip.

    Mask values: 0 where no polygon lies, ``k + 1`` for class ``k`` (classes sorted by name; where polygons
    overlap, the later feature wins). Chips with less than ``min_labelled`` labelled pixels are skipped.
    Writes ``images/``, ``masks/`` and ``classes.json`` into ``out_dir`` (each file atomically).

    Raises:
        ExploraGeoError: missing class column, no labels over the raster, fewer than two classes.
    """
    from rasterio.features import rasterize
    from rasterio.transform import from_origin
    from shapely.geometry import box

    if chip_size < 1 or (stride is not None and stride < 1):
        raise ExploraGeoError(f"chip size {chip_size} and stride {stride} must be positive numbers of pixels.")
    gdf, layout, names, (crs, res, (left, bottom, right, top)) = labelled_mosaic(
        vector, raster, class_column, res=res, bands=bands, file_bands=file_bands, layer=layer)
    gdf = gdf[gdf.intersects(box(left, bottom, right, top))]
    if len(gdf) == 0:
        raise ExploraGeoError(f"no label of {vector} overlaps the raster {raster}; check that they overlap.")
    classes = sorted({class_folder_name(v) for v in gdf[class_column]})
    if len(classes) < 2:
        raise ExploraGeoError(f"the labels over the raster have a single class ({classes[0]}) in column "
                              f"{class_column!r}; segmentation needs at least two.")
    values = np.asarray([classes.index(class_folder_name(v)) + 1 for v in gdf[class_column]])
    geoms = gdf.geometry.reset_index(drop=True)
    tree = geoms.sindex
    span, step = chip_size * res, (stride or chip_size) * res
    out = Path(out_dir)
    images: list[Path] = []
    masks: list[Path] = []
    with open_bands(layout, names) as handles:
        y1 = top
        while y1 - span >= bottom - 1e-6:
            x0 = left
            while x0 + span <= right + 1e-6:
                hits = np.sort(tree.query(box(x0, y1 - span, x0 + span, y1)))  # keep file order: later wins
                if not len(hits):
                    x0 += step
                    continue
                mask = rasterize(zip(geoms.iloc[hits], values[hits].tolist(), strict=True),
                                 out_shape=(chip_size, chip_size), transform=from_origin(x0, y1, res, res),
                                 fill=UNLABELLED, dtype="uint8")
                if (mask != UNLABELLED).mean() >= min_labelled:
                    name = f"chip_{len(images):05d}.tif"
                    chip = read_window(handles, layout, names, x0, y1, chip_size, res)
                    images.append(write_geotiff(out / "images" / name, chip, crs, x0, y1, res, names))
                    masks.append(write_geotiff(out / "masks" / name, mask[None], crs, x0, y1, res, ["class"]))
                x0 += step
            y1 -= step
    if not images:
        raise ExploraGeoError(f"no {chip_size}-px chip of {raster} has {min_labelled:.0%} labelled pixels; lower "
                              "min_labelled or the chip size.")
    write_text_atomic(out / "classes.json", json.dumps({"classes": classes, "unlabelled": UNLABELLED,
                                                         "class_column": class_column, "source": str(vector)},
                                                        indent=2))
    return MaskIndex(tuple(images), tuple(masks), tuple(classes))

"""Labelled chips for downstream tasks: chip folders, seeded stratified splits, vector labels -> chips.

A *chip folder* has the EuroSAT layout: one sub-folder per class, each holding GeoTIFF chips::

    root/AnnualCrop/AnnualCrop_1.tif
    root/Forest/Forest_7.tif
    ...

The band order of the files is free: the bands a model needs are picked BY NAME
(:func:`explora_geo.sensors.select_bands`). The names of the file's bands come from the GeoTIFF band
descriptions when present, else from a ``file_bands`` specification (a layout name such as ``"eurosat"``,
a sensor preset, or an explicit list); see :func:`resolve_file_bands`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import SENSORS, canonical_band_name, select_bands

__all__ = [
    "EUROSAT_FILE_BANDS",
    "FILE_LAYOUTS",
    "ChipIndex",
    "ChipDataset",
    "scan_chip_folder",
    "resolve_file_bands",
    "read_band_names",
    "stratified_split",
    "vector_labels_to_chips",
    "read_vector_labels",
    "class_folder_name",
    "mosaic_bands",
    "mosaic_grid",
    "read_chip",
    "read_window",
    "write_geotiff",
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
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ExploraGeoError(f"split fractions {tuple(fractions)} must be three non-negative numbers "
                              "(train, val, test) summing to 1.")
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
        n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
        n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
        if n - n_val - n_test < 1:
            raise ExploraGeoError(f"class {int(c)} has only {n} samples, too few for a train/val/test split "
                                  f"{tuple(fractions)}; add samples of that class or drop it.")
        parts[0].append(idx[: n - n_val - n_test])
        parts[1].append(idx[n - n_val - n_test: n - n_test])
        parts[2].append(idx[n - n_test:])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


class ChipDataset(Dataset):
    """Chips of a :class:`ChipIndex` as model inputs.

    A sample is ``{"image": float32 [C, H, W], "label": int64 []}`` with C = ``len(bands)`` in the order of
    ``bands`` (the model's band names), scaled by ``normalization`` and resized to ``img_size`` (bilinear)
    when given. Files are opened lazily per item (safe with DataLoader workers).

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
        index: ChipIndex,
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
            self._band_idx(index.paths[int(self.indices[0])])  # fail early on a band mismatch

    def _band_idx(self, path: Path) -> list[int]:
        names = resolve_file_bands(self.file_bands, path)
        return select_bands(names, self.bands, source=str(path))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = int(self.indices[i])
        path = self.index.paths[k]
        image = read_chip(path, self._band_idx(path), self.normalization, self.img_size)
        return {"image": image, "label": torch.tensor(self.index.labels[k], dtype=torch.long)}


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


# --------------------------------------------------------------------------------------------------------
# Vector labels -> chips
# --------------------------------------------------------------------------------------------------------

_S2_FILE = re.compile(r"_(B\d{1,2}A?)\.(jp2|tif|tiff)$", re.IGNORECASE)


def mosaic_bands(
    source: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    file_bands: str | Sequence[str] | None = None,
) -> dict[str, tuple[Path, int]]:
    """Where each band of a mosaic lives: ``{band name: (file, 1-based band index)}``.

    Args:
        source: a multi-band raster file (band names from its descriptions or ``file_bands``); a folder of
            one-band files named like Sentinel-2 products (``*_B02.jp2``, ``*_B8A.tif``); or a mapping of
            band name to one-band file.
        file_bands: band naming for a multi-band file without descriptions (see :func:`resolve_file_bands`).
    """
    if isinstance(source, Mapping):
        return {canonical_band_name(k): (Path(v), 1) for k, v in source.items()}
    path = Path(source)
    if path.is_dir():
        found = {}
        for f in sorted(path.iterdir()):
            match = _S2_FILE.search(f.name)
            if match:
                found[canonical_band_name(match.group(1))] = (f, 1)
        if not found:
            raise ExploraGeoError(f"folder {path} has no band files named like *_B02.jp2 / *_B8A.tif; pass a "
                                  "multi-band GeoTIFF or a folder of Sentinel-2 band files.")
        return found
    if not path.is_file():
        raise ExploraGeoError(f"raster {path} does not exist; pass a GeoTIFF mosaic or a folder of band files.")
    names = resolve_file_bands(file_bands, path)
    return {canonical_band_name(n): (path, i + 1) for i, n in enumerate(names)}


class MosaicGrid(NamedTuple):
    """Common CRS, output resolution (CRS units per pixel) and extent ``(left, bottom, right, top)`` of the
    bands of a mosaic."""

    crs: Any
    res: float
    bounds: tuple[float, float, float, float]


def mosaic_grid(layout: Mapping[str, tuple[Path, int]], names: Sequence[str],
                res: float | None = None) -> MosaicGrid:
    """The CRS, resolution (default: the finest band's) and the extent every band in ``names`` covers.

    Raises:
        ExploraGeoError: bands in different CRSs.
    """
    import rasterio

    boxes = {}
    crs = None
    for name in names:
        with rasterio.open(layout[name][0]) as src:
            crs = src.crs if crs is None else crs
            if src.crs != crs:
                raise ExploraGeoError(f"band {name} ({layout[name][0]}) is in {src.crs}, not {crs} like band "
                                      f"{names[0]}; reproject the mosaic to one CRS first.")
            boxes[name] = (src.bounds, abs(src.transform.a))
    bounds = (max(b.left for b, _ in boxes.values()), max(b.bottom for b, _ in boxes.values()),
              min(b.right for b, _ in boxes.values()), min(b.top for b, _ in boxes.values()))
    return MosaicGrid(crs, float(res) if res is not None else min(r for _, r in boxes.values()), bounds)


def read_window(handles: Mapping[str, Any], layout: Mapping[str, tuple[Path, int]], names: Sequence[str],
                x0: float, y1: float, size: int, res: float) -> np.ndarray:
    """``[C, size, size]`` pixels of bands ``names`` over the square with top-left corner ``(x0, y1)`` (CRS
    units) at resolution ``res``; coarser bands are resampled bilinearly. ``handles``: open datasets."""
    from rasterio.enums import Resampling
    from rasterio.windows import from_bounds

    span = size * res
    return np.stack([
        handles[n].read(layout[n][1], out_shape=(size, size), resampling=Resampling.bilinear,
                        window=from_bounds(x0, y1 - span, x0 + span, y1, transform=handles[n].transform))
        for n in names
    ])


def write_geotiff(path: Path, data: np.ndarray, crs: Any, x0: float, y1: float, res: float,
                  names: Sequence[str] | None = None) -> Path:
    """Write ``data`` ``[C, H, W]`` as a GeoTIFF with top-left ``(x0, y1)``, atomically (temp name, rename)."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=from_origin(x0, y1, res, res))
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        if names is not None:
            dst.descriptions = tuple(names)
    os.replace(tmp, path)
    return path


def read_vector_labels(vector: str | os.PathLike[str], class_column: str, layer: str | None = None) -> Any:
    """The features of a vector file that have a geometry and a ``class_column`` value (a GeoDataFrame).

    Raises:
        ExploraGeoError: missing file, missing class column (listing the columns), no CRS, no usable feature.
    """
    import geopandas as gpd

    path = Path(vector)
    if not path.exists():
        raise ExploraGeoError(f"vector label file {path} does not exist.")
    gdf = gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    if class_column not in gdf.columns:
        columns = [c for c in gdf.columns if c != gdf.geometry.name]
        raise ExploraGeoError(f"{path} has no class column {class_column!r}; its columns are "
                              f"{', '.join(map(str, columns))}; pass one of them as the class column.")
    if gdf.crs is None:
        raise ExploraGeoError(f"{path} has no CRS; set one (e.g. with ogr2ogr -a_srs) so labels can be placed.")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty & gdf[class_column].notna()]
    if len(gdf) == 0:
        raise ExploraGeoError(f"{path} has no features with a geometry and a {class_column!r} value.")
    return gdf


def class_folder_name(value: Any) -> str:
    """A class value as a safe folder name (``3.0`` -> ``"3"``, ``"Forest, dense"`` -> ``"Forest_dense"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = re.sub(r"[^\w.-]+", "_", str(value)).strip("._")
    return name or "class"


def vector_labels_to_chips(
    vector: str | os.PathLike[str],
    raster: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    class_column: str,
    chip_size: int = 64,
    res: float | None = None,
    bands: Sequence[str] | None = None,
    file_bands: str | Sequence[str] | None = None,
    layer: str | None = None,
    skip_outside: bool = False,
) -> ChipIndex:
    """Cut one chip per labelled point or polygon out of a mosaic, into a chip folder.

    Each feature gives a ``chip_size`` x ``chip_size`` chip centred on the point (or on the polygon's
    representative point, which lies inside it), at ground resolution ``res`` (metres per pixel in the
    raster's CRS; default: the finest band). Labels may be in any CRS: they are reprojected to the raster's.
    Bands of coarser resolution are resampled bilinearly. Chips are written as
    ``out_dir/<class>/<class>_<feature index>.tif`` with band descriptions, CRS and transform, each written
    to a temporary name and then renamed.

    Args:
        vector: any file geopandas reads (GeoPackage, shapefile, GeoJSON, ...).
        raster: the mosaic; see :func:`mosaic_bands`.
        out_dir: the chip folder to create / fill.
        class_column: attribute holding the class of each feature.
        chip_size: chip height and width in pixels.
        res: output resolution in CRS units per pixel.
        bands: bands to write (default: all bands of the mosaic, in its order).
        file_bands: band naming of a multi-band raster without descriptions.
        layer: layer of a multi-layer vector file.
        skip_outside: skip features whose chip is not fully inside the raster instead of failing.

    Returns:
        The index of the written chips.

    Raises:
        ExploraGeoError: missing class column; labels outside the raster (naming the feature indices);
            fewer than two classes; a requested band missing from the mosaic.
    """
    import rasterio

    if chip_size < 1:
        raise ExploraGeoError(f"chip size {chip_size} must be a positive number of pixels.")
    gdf = read_vector_labels(vector, class_column, layer)
    layout = mosaic_bands(raster, file_bands)
    names = list(layout) if bands is None else [list(layout)[i] for i in select_bands(list(layout), bands,
                                                                                       source=str(raster))]
    crs, res, (left, bottom, right, top) = mosaic_grid(layout, names, res)
    gdf = gdf.to_crs(crs)
    half = chip_size * res / 2.0
    centres = [g if g.geom_type == "Point" else g.representative_point() for g in gdf.geometry]
    windows, outside = [], []
    for pos, c in enumerate(centres):
        x0, y1 = c.x - half, c.y + half
        if x0 < left or c.y - half < bottom or c.x + half > right or y1 > top:
            outside.append(pos)
        else:
            windows.append((pos, x0, y1))
    if outside and not skip_outside:
        shown = ", ".join(str(gdf.index[p]) for p in outside[:10]) + (" ..." if len(outside) > 10 else "")
        raise ExploraGeoError(
            f"{len(outside)} of {len(gdf)} labels in {vector} have chips ({chip_size} px at {res:g} m) not fully "
            f"inside the raster (features {shown}); fix those labels or skip them (skip_outside / --skip-outside)."
        )
    if not windows:
        raise ExploraGeoError(f"no label of {vector} has a chip inside the raster {raster}; check that they "
                              "overlap.")
    classes = sorted({class_folder_name(gdf[class_column].iloc[p]) for p, _, _ in windows})
    if len(classes) < 2:
        raise ExploraGeoError(f"the labels inside the raster have a single class ({classes[0]}) in column "
                              f"{class_column!r}; classification needs at least two.")

    out = Path(out_dir)
    handles = {name: rasterio.open(layout[name][0]) for name in names}
    paths: list[Path] = []
    labels: list[int] = []
    try:
        for pos, x0, y1 in windows:
            cls = class_folder_name(gdf[class_column].iloc[pos])
            chip = read_window(handles, layout, names, x0, y1, chip_size, res)
            paths.append(write_geotiff(out / cls / f"{cls}_{gdf.index[pos]}.tif", chip, crs, x0, y1, res, names))
            labels.append(classes.index(cls))
    finally:
        for h in handles.values():
            h.close()
    return ChipIndex(tuple(paths), tuple(labels), tuple(classes))

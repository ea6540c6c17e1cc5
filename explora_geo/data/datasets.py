"""torchgeo datasets over our inputs, usable from plain torchgeo code.

- :class:`MosaicDataset`: multi-band GeoTIFF mosaics (any mix of CRSs and resolutions; torchgeo warps them to
  one CRS and resolution), bands chosen by name.
- :class:`BandFilesDataset`: per-band files (``T33UUU_20170216T102101_B02.jp2``, BigEarthNet's
  ``<patch>_B8A.tif``), each scene's bands resampled onto one grid.
- :func:`open_dataset` picks the right one for an input.

Both are :class:`torchgeo.datasets.RasterDataset` subclasses: ``ds[xmin:xmax:res, ymin:ymax:res]`` returns a
torchgeo sample (``image`` float32 ``[C, H, W]`` in digital numbers, bands in the requested order,
``bounds``, ``transform``) and they compose with other torchgeo datasets (``&``, ``|``) and samplers
(``RandomPatchSampler``, ``GriddedPatchSampler``, collate with ``stack_samples``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchgeo.datasets import RasterDataset

from explora_geo.data.catalog import Catalog, DataSpec, build_catalog
from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import Sensor, select_bands

__all__ = ["MosaicDataset", "BandFilesDataset", "open_dataset"]


def _pyproj(crs: Any) -> Any:
    from pyproj import CRS

    return CRS.from_wkt(crs.to_wkt())


def _path_key(path: str) -> str:
    """A file's key in the catalog: absolute for local paths; GDAL virtual paths (``/vsicurl/https://...``,
    STAC assets) as they are, since ``abspath`` would fold their ``//``."""
    text = os.fspath(path)
    return text if text.startswith("/vsi") else os.path.abspath(text)


def _catalog(
    data: DataSpec | None, catalog: Catalog | None, kwargs: dict[str, Any]
) -> Catalog:
    if catalog is not None:
        return catalog
    if data is None:
        raise ExploraGeoError("no input given; pass paths (a folder, a glob or raster files).")
    return build_catalog(data, **kwargs)


class _CatalogDataset(RasterDataset):
    """What both datasets share: they are built from a :class:`Catalog` of one ``kind``."""

    _kind = ""
    _wrong_kind = ""  # the error for a catalog of the other kind

    def _use_catalog(self, cat: Catalog) -> None:
        """Check ``cat``'s kind and take its bands and (user-given) nodata; call before ``RasterDataset``'s
        ``__init__``."""
        if cat.kind != self._kind:
            raise ExploraGeoError(self._wrong_kind)
        self.catalog = cat
        self.all_bands = cat.file_bands
        if cat.nodata_origin == "user":
            self.nodata = cat.nodata


class MosaicDataset(_CatalogDataset):
    """Multi-band raster mosaics as a torchgeo :class:`~torchgeo.datasets.RasterDataset`.

    Args:
        paths: folder, glob, file or list of those (all files hold the same number of bands; files whose
            bands are named by descriptions may order them differently).
        bands: band names to return, in this order (names or sensor aliases, e.g. ``"B8A"``, ``"nir"``).
        sensor: preset naming the files' bands when they carry no descriptions.
        band_names: names of the files' bands in file order (overrides descriptions and preset).
        crs, res: target CRS and resolution (defaults chosen by :func:`build_catalog` and listed in
            ``catalog.notes``).
        nodata: nodata value overriding the files' metadata.
        transforms: torchgeo sample transform.
        cache: cache open file handles per process (torchgeo's ``cache``).
        catalog: a prebuilt catalog (then the discovery arguments are ignored).
    """

    filename_glob = "*"
    _kind = "mosaic"
    _wrong_kind = "these are per-band files; use BandFilesDataset or open_dataset."

    def __init__(
        self,
        paths: DataSpec | None = None,
        *,
        bands: Sequence[str] = (),
        sensor: str | Sensor | None = "sentinel2",
        band_names: Sequence[str] | None = None,
        crs: Any = None,
        res: float | tuple[float, float] | None = None,
        nodata: float | None = None,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        cache: bool = True,
        catalog: Catalog | None = None,
    ) -> None:
        cat = _catalog(paths, catalog, dict(bands=bands, sensor=sensor, band_names=band_names, nodata=nodata,
                                            res=res, crs=crs))
        self._use_catalog(cat)
        idx = select_bands(cat.file_bands, cat.bands, sensor=cat.sensor, source="the mosaic")
        # 1-based band indexes of the requested bands in each file (files may order their bands differently)
        self._indexes = {s.channels[0][0]: tuple(b for _, b in s.channels) for s in cat.sources}
        super().__init__(paths=cat.files, crs=_pyproj(cat.crs), res=cat.res,
                         bands=[cat.file_bands[i] for i in idx], transforms=transforms, cache=cache)

    def _merge_or_stack(self, filepaths: Sequence[str], index: Any, band_indexes: Sequence[int] | None = None,
                        out_crs: Any = None) -> Tensor:
        """torchgeo's merge, per group of files sharing a band order; groups fill each other's gaps.

        Returns ``[C, H, W]`` (requested bands). Where several files cover a pixel, the first file (in the
        index order) with data wins, as in torchgeo.
        """
        groups: dict[tuple[int, ...], list[str]] = {}
        for path in filepaths:
            groups.setdefault(self._indexes[_path_key(path)], []).append(path)
        merged: Tensor | None = None
        for indexes, paths in groups.items():
            part = super()._merge_or_stack(paths, index, list(indexes), out_crs)
            if merged is None:
                merged = part
                continue
            fill = 0.0 if self.catalog.nodata is None else self.catalog.nodata
            gap = (merged == fill).all(dim=-3, keepdim=True)
            merged = torch.where(gap, part, merged)
        assert merged is not None
        return merged


class BandFilesDataset(_CatalogDataset):
    """Scenes stored one file per band, as a torchgeo :class:`~torchgeo.datasets.RasterDataset`.

    Files named ``<stem>_<band>[_<res>m].<ext>`` with the same ``<stem>`` form a scene. The index holds each
    scene's finest requested band; the other bands are read from their own files and resampled to the
    dataset's resolution (bilinear, as torchgeo does for float images). Arguments as :class:`MosaicDataset`.
    """

    separate_files = True
    _kind = "band_files"
    _wrong_kind = "these are multi-band files; use MosaicDataset or open_dataset."

    def __init__(
        self,
        paths: DataSpec | None = None,
        *,
        bands: Sequence[str] = (),
        sensor: str | Sensor | None = "sentinel2",
        crs: Any = None,
        res: float | tuple[float, float] | None = None,
        nodata: float | None = None,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        cache: bool = True,
        catalog: Catalog | None = None,
    ) -> None:
        cat = _catalog(paths, catalog, dict(bands=bands, sensor=sensor, nodata=nodata, res=res, crs=crs))
        self._use_catalog(cat)
        # Each scene is indexed through the file of its first requested band; _update_filepath finds the rest.
        self._scene_of = {s.channels[0][0]: s for s in cat.sources}
        super().__init__(paths=list(self._scene_of), crs=_pyproj(cat.crs), res=cat.res, bands=list(cat.bands),
                         transforms=transforms, cache=cache)

    @property
    def files(self) -> list[str]:
        """The indexed file of every scene."""
        return sorted(self._scene_of)

    def _update_filepath(self, band: str, filepath: str) -> str:
        source = self._scene_of[_path_key(filepath)]
        return source.channels[self.catalog.bands.index(band)][0]


def open_dataset(
    data: DataSpec | None = None,
    *,
    bands: Sequence[str] = (),
    sensor: str | Sensor | None = "sentinel2",
    band_names: Sequence[str] | None = None,
    crs: Any = None,
    res: float | tuple[float, float] | None = None,
    nodata: float | None = None,
    transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    catalog: Catalog | None = None,
) -> MosaicDataset | BandFilesDataset:
    """The torchgeo dataset for ``data``: :class:`BandFilesDataset` for per-band files, else
    :class:`MosaicDataset`. See :func:`explora_geo.data.catalog.build_catalog` for the arguments; a prebuilt
    ``catalog`` replaces them."""
    cat = _catalog(data, catalog, dict(bands=bands, sensor=sensor, band_names=band_names, nodata=nodata,
                                       res=res, crs=crs))
    if cat.kind == "band_files":
        return BandFilesDataset(catalog=cat, transforms=transforms)
    return MosaicDataset(catalog=cat, transforms=transforms)

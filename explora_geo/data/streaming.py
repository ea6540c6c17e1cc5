"""``StoreDataModule``: pre-training batches streamed from a prepared patch store (LitData).

The store (a folder or an object-store URL written by :func:`~explora_geo.data.prepare.prepare_store`) is read
with LitData's ``StreamingDataset`` + ``StreamingDataLoader``:

- shuffled (chunk order and items within chunks, reshuffled every epoch from ``seed``);
- under DDP every rank (and node) streams a disjoint part of the chunks (LitData's own split, from
  ``torch.distributed``); the last items that do not divide evenly are dropped so ranks stay in step;
- exact resume: the loader's ``state_dict`` (epoch, samples consumed per worker) goes into Lightning's
  checkpoint and ``load_state_dict`` restarts at the next unseen batch;
- URL stores are downloaded chunk by chunk into a local cache (``cache_dir``, bounded by ``max_cache_size``).

Batches keep the pre-training contract (docs/architecture.md): ``image`` float32 ``[B, C, H, W]``
(normalised, bands in ``bands`` order, missing pixels filled with the patch's band mean), ``valid_mask`` bool
``[B, H, W]``, ``index`` int64 ``[B, 2]`` (epoch, patch id), ``rejected`` int64 ``[B]`` (always 0: the store
holds accepted patches only) and ``source`` int64 ``[B]`` (the file's position in the store's ``files``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset

from explora_geo.data.nodata import fill_nodata
from explora_geo.data.store import is_url, read_store_metadata, store_band_indexes
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization

__all__ = ["StoreDataModule", "StoreDataset"]


class StoreDataset(StreamingDataset):
    """A patch store as a LitData ``StreamingDataset`` whose items follow the pre-training batch contract.

    Args:
        store: folder or URL of the store.
        band_indexes: positions of the wanted bands in the store's bands (output order).
        normalization: applied to the nodata-filled float32 image (``None``: digital numbers minus ``offset``).
        offset: DN offset of the store (subtracted when ``normalization`` is ``None``).
        **kwargs: passed to ``StreamingDataset`` (``shuffle``, ``seed``, ``cache_dir``, ...).
    """

    def __init__(self, store: str, *, band_indexes: Sequence[int], normalization: Normalization | None,
                 offset: float = 0.0, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.band_indexes = list(band_indexes)
        self.normalization = normalization
        self.offset = float(offset)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        item = super().__getitem__(index)
        raw = np.asarray(item["image"])[self.band_indexes]  # [C, H, W], file dtype
        valid = np.asarray(item["valid_mask"], dtype=bool)
        image = fill_nodata(raw, valid)
        if self.normalization is not None:
            image = self.normalization(image)
        elif self.offset:
            image = image - np.float32(self.offset)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "valid_mask": torch.from_numpy(np.ascontiguousarray(valid)),
            "index": torch.tensor([self.current_epoch, int(item["patch_id"])], dtype=torch.long),
            "rejected": torch.tensor(0, dtype=torch.long),
            "source": torch.tensor(int(item["source_index"]), dtype=torch.long),
        }


def store_normalization(normalization: Normalization | None, meta: dict[str, Any], bands: Sequence[str]
                        ) -> Normalization | None:
    """``normalization`` for ``bands`` with the store's DN offset when it carries none."""
    if normalization is None:
        return None
    norm = normalization.select(bands)
    offset = float(meta.get("dn_offset") or 0.0)
    if norm.offset is None and offset:
        norm = dataclasses.replace(norm, offset=(offset,) * len(norm.bands))
    return norm


class StoreDataModule(L.LightningDataModule):
    """Batches of a prepared patch store for pre-training.

    Args:
        store: folder or object-store URL written by ``explora-geo prepare``.
        bands: the model's bands, in order (a subset of the store's bands, chosen by name).
        batch_size: patches per batch (per process).
        num_workers: loader worker processes.
        normalization: scaling (``None``: digital numbers minus the store's DN offset); see
            :meth:`from_store_stats` for the store's own statistics.
        patch_size: the model's input size in px; must equal the store's patch size (``None``: not checked).
        seed: shuffling seed.
        shuffle: shuffle chunks and items (default True).
        cache_dir: local cache of a URL store's chunks (default: LitData's).
        max_cache_size: bound of that cache (e.g. ``"50GB"``).
        storage_options: object-store options (endpoint, credentials) passed to LitData.

    Raises:
        ExploraGeoError: the store cannot be read (missing, incomplete, unreachable URL), lacks some of
            ``bands`` (both sets named), or has another patch size.
    """

    def __init__(self, store: str | os.PathLike[str], *, bands: Sequence[str], batch_size: int,
                 num_workers: int = 0, normalization: Normalization | None = None, patch_size: int | None = None,
                 seed: int = 0, shuffle: bool = True, cache_dir: str | None = None,
                 max_cache_size: str = "100GB", storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ExploraGeoError(f"batch_size {batch_size} / num_workers {num_workers} must be >= 1 / >= 0.")
        self.store = os.fspath(store) if is_url(os.fspath(store)) else os.path.abspath(store)
        self.meta = read_store_metadata(self.store, storage_options)
        self.bands = tuple(bands)
        self.band_indexes = store_band_indexes(self.meta, self.bands, self.store)
        if patch_size is not None and int(patch_size) != int(self.meta["patch_size"]):
            raise ExploraGeoError(
                f"store {self.store} holds {self.meta['patch_size']} px patches but the model takes {patch_size} px; "
                f"pass --img-size {self.meta['patch_size']} or prepare a store with --patch-size {patch_size}."
            )
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.normalization = store_normalization(normalization, self.meta, self.bands)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.storage_options = storage_options
        self.loader: StreamingDataLoader | None = None

    def store_statistics_normalization(self, scheme: str) -> Normalization:
        """A ``meanstd`` / ``satmae`` normalisation of this module's bands from the store's statistics."""
        from explora_geo.data.stats import normalization_from_stats

        return normalization_from_stats(self.meta["stats"], scheme, bands=self.bands)

    def train_dataloader(self) -> StreamingDataLoader:
        """The streaming loader (built here, after DDP started, so LitData sees every rank)."""
        dataset = StoreDataset(
            self.store, band_indexes=self.band_indexes, normalization=self.normalization,
            offset=float(self.meta.get("dn_offset") or 0.0), shuffle=self.shuffle, seed=self.seed,
            cache_dir=self.cache_dir, max_cache_size=self.max_cache_size, storage_options=self.storage_options,
        )
        self.loader = StreamingDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                          persistent_workers=False)
        return self.loader

    def val_dataloader(self) -> list[Any]:
        """No held-out patches: a store is all training data (prepare a second store to validate on)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the position lives in the loader's own ``state_dict`` (saved by Lightning)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here (see :meth:`state_dict`)."""

    def describe(self) -> str:
        """A few lines for logs: the store, its patches, bands, GSD, CRSs and counts."""
        m = self.meta
        counts = m.get("counts", {})
        crs = ", ".join(g["crs"] for g in m.get("groups", []))
        return (f"store: {self.store} ({counts.get('written', '?')} patches of {m['patch_size']} px, "
                f"{len(m.get('files', []))} files, crs {crs}, gsd {m.get('gsd_m')} m)\n"
                f"bands: {', '.join(self.bands)} of {', '.join(m['bands'])}; nodata {m.get('nodata')}; "
                f"dn offset {m.get('dn_offset')}\n"
                f"prepared: {counts.get('requested', '?')} requested, {counts.get('rejected', '?')} rejected, "
                f"{counts.get('unreadable', '?')} unreadable, {len(m.get('files_skipped', []))} files skipped")

"""Deterministic random patches with nodata rejection: :class:`WindowSampler` and :class:`PatchDataset`.

Sample ``i`` of epoch ``e`` is drawn with ``numpy.random.default_rng([seed, e, i, attempt])``, so it depends
only on ``(seed, e, i)`` whatever the worker count or the order of reads. A draw picks a unit (file or
scene) with probability proportional to the area where a patch can be cut (inside the region of interest when
one is given: the patch centre must lie in it), then a pixel-aligned window of that unit's grid. A patch
with more than ``max_nodata_fraction`` missing pixels is rejected and redrawn (``attempt + 1``).

Two readers cut the same window of the same unit grid: the fast path
(:class:`~explora_geo.data.fast.PatchReader`: direct windowed reads) and the torchgeo path (one
:mod:`~explora_geo.data.datasets` dataset per unit CRS, at the catalog's GSD in that CRS's units, queried with
the window's bounds). Both return the same pixels for every file in a projected CRS; for a file in a geographic
CRS both resample bilinearly into its UTM zone, torchgeo through its own intermediate warp grid, so those
pixels agree closely but not exactly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from explora_geo.data.catalog import Catalog, Source
from explora_geo.data.nodata import fill_nodata, nodata_fraction, valid_mask
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization

__all__ = ["Window", "WindowSampler", "PatchDataset", "EpochSampler", "load_roi", "roi_polygon"]


@dataclass(frozen=True)
class Window:
    """A square patch of unit ``source``: top-left ``(row, col)`` and side ``size`` in pixels of its grid."""

    source: int
    row: int
    col: int
    size: int


def load_roi(path: str | os.PathLike[str]) -> Any:
    """The union of a vector file's geometries, with its CRS, as a one-row GeoSeries.

    Raises:
        ExploraGeoError: the file is missing, unreadable, empty or has no CRS.
    """
    import geopandas as gpd

    if not os.path.exists(path):
        raise ExploraGeoError(f"region of interest {path} does not exist; pass a vector file (GeoPackage, ...).")
    try:
        frame = gpd.read_file(path)
    except Exception as err:  # pyogrio raises several types
        raise ExploraGeoError(f"cannot read region of interest {path} ({err}); pass a vector file.") from err
    if frame.empty or frame.crs is None:
        raise ExploraGeoError(f"region of interest {path} is empty or has no CRS; give it polygons and a CRS.")
    return gpd.GeoSeries([frame.geometry.union_all()], crs=frame.crs)


def roi_polygon(path: str | os.PathLike[str], crs: Any) -> Any:
    """The region of interest of a vector file as a shapely geometry in ``crs`` (e.g. a torchgeo dataset's
    ``ds.crs``), ready for the ``roi=`` of torchgeo's ``RandomPatchSampler`` / ``GriddedPatchSampler``."""
    return load_roi(path).to_crs(crs).iloc[0]


class WindowSampler:
    """Draws pixel windows over a set of units.

    Args:
        sources: the units.
        size: patch side in pixels.
        roi: optional one-row GeoSeries (see :func:`load_roi`), reprojected to each unit's CRS.
        rows: optional ``(start, stop)`` fractions of every unit's height: whole patches lie inside that band
            of rows (a pixel margin keeps patches of ``(0, f)`` and ``(f, 1)`` disjoint: a held-out split).

    Raises:
        ExploraGeoError: the patch is larger than every unit, or the ROI (or the band of rows) misses the data.
    """

    def __init__(self, sources: Sequence[Source], size: int, roi: Any = None, *,
                 rows: tuple[float, float] | None = None) -> None:
        import shapely
        from shapely import affinity

        if size < 1:
            raise ExploraGeoError(f"patch size {size} is not positive; pass a size in pixels, e.g. 224.")
        self.size = size
        self.regions: list[Any] = []
        self.shapes = [(s.width, s.height) for s in sources]
        weights = []
        for source in sources:
            # allowed patch centres, widened by half a pixel so that a unit exactly one patch wide keeps
            # one position: the area is the number of top-left positions (W - size + 1) x (H - size + 1)
            lo = size / 2 - 0.5
            region = shapely.box(lo, lo, source.width - lo, source.height - lo)
            if source.width < size or source.height < size:
                region = shapely.Polygon()
            elif roi is not None:
                inv = ~source.transform
                geom = roi.to_crs(source.crs).iloc[0]
                pix = affinity.affine_transform(geom, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f])
                region = region.intersection(pix)
            if rows is not None and not region.is_empty:
                # patch rows [y - size/2, y + size/2) inside [top, bottom), one pixel of margin each side
                top, bottom = round(rows[0] * source.height), round(rows[1] * source.height)
                lo_y = top + size / 2 + (1 if top > 0 else -0.5)
                hi_y = bottom - size / 2 - (1 if bottom < source.height else -0.5)
                band = shapely.box(-1.0, lo_y, source.width + 1.0, hi_y) if hi_y >= lo_y else shapely.Polygon()
                region = region.intersection(band)
            shapely.prepare(region)
            self.regions.append(region)
            weights.append(region.area if not region.is_empty else 0.0)
        total = float(sum(weights))
        if total <= 0:
            largest = max(sources, key=lambda s: s.width * s.height)
            if all(s.width < size or s.height < size for s in sources):
                raise ExploraGeoError(
                    f"patch size {size} px is larger than every input (largest: {largest.name}, "
                    f"{largest.width} x {largest.height} px); use a smaller patch size."
                )
            if rows is not None:
                raise ExploraGeoError(
                    f"no whole {size} px patch fits in rows {rows[0]:g}-{rows[1]:g} of any input (the held-out "
                    "split); lower the held-out fraction, use a smaller patch size or larger inputs."
                )
            raise ExploraGeoError(
                "the region of interest does not overlap the data; check the ROI file and its CRS."
            )
        self.probs = np.asarray(weights) / total

    def draw(self, rng: np.random.Generator) -> Window:
        """One window: a unit by area, then a centre uniformly inside its region."""
        import shapely

        index = int(rng.choice(len(self.probs), p=self.probs))
        region = self.regions[index]
        xmin, ymin, xmax, ymax = region.bounds
        for _ in range(10000):  # rejection sampling of the centre; a box accepts at once
            x, y = rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)
            if shapely.contains_xy(region, x, y):
                break
        width, height = self.shapes[index]
        col = min(max(int(round(x - self.size / 2)), 0), width - self.size)
        row = min(max(int(round(y - self.size / 2)), 0), height - self.size)
        return Window(index, row, col, self.size)


class EpochSampler(DistributedSampler):
    """Yields ``(epoch, i)`` for the sample indices ``i`` of this rank; Lightning calls :meth:`set_epoch`.

    Sharding across distributed ranks is built in: rank ``r`` of ``world`` takes ``i = r, r + world, ...``
    below ``world * (length // world)`` (the tail is dropped so every rank has as many batches). It is a
    ``DistributedSampler`` so that Lightning does not wrap it (or rebuild the data loader) under DDP.

    ``resume`` (a dict with ``epoch`` and a global ``next_index``, shared with the data module) makes the
    next iteration of that epoch skip the samples already consumed (``i >= next_index``); it is used once,
    so iterating the same epoch again yields it whole.

    Args:
        length: samples per epoch, all ranks together.
        resume: the shared position dict.
        rank, world: this process's rank and the world size (default: from ``torch.distributed`` when it is
            initialised, else 0 and 1).
    """

    def __init__(self, length: int, resume: dict[str, int] | None = None, *, rank: int | None = None,
                 world: int | None = None) -> None:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        world = world if world is not None else (dist.get_world_size() if ready else 1)
        rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if length < world:
            raise ExploraGeoError(f"samples per epoch {length} is fewer than the {world} processes; raise it.")
        super().__init__(range(length), num_replicas=world, rank=rank, shuffle=False, drop_last=True)
        self.length = length
        self.world, self.rank = world, rank
        self.resume = resume if resume is not None else {}

    def _start(self) -> int:
        return self.resume.get("next_index", 0) if self.resume.get("epoch", -1) == self.epoch else 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        stop = self.world * (self.length // self.world)
        first = self._start()
        self.resume.clear()  # a resume point serves one iteration
        first += (self.rank - first) % self.world  # first index of this rank at or after the start
        return ((self.epoch, i) for i in range(first, stop, self.world))

    def __len__(self) -> int:
        # Always this rank's full epoch: Lightning sizes every epoch from it once, and counts a resumed
        # epoch's already-consumed batches itself.
        return self.length // self.world

    def remaining(self) -> int:
        """Samples the next iteration yields (fewer than ``len`` in a resumed epoch)."""
        first = self._start()
        first += (self.rank - first) % self.world
        return len(range(first, self.world * (self.length // self.world), self.world))

    def next_index(self, last: int) -> int:
        """Global position after this rank consumed sample ``last`` (ranks advance in lockstep)."""
        return last - self.rank + self.world


def _with_offset(normalization: Normalization | None, catalog: Catalog) -> Normalization | None:
    """``normalization`` for the catalog's bands, given the catalog's DN offset unless it has its own."""
    if normalization is None:
        return None
    norm = normalization.select(catalog.bands)
    if norm.offset is None and catalog.offset:
        norm = dataclasses.replace(norm, offset=(catalog.offset,) * len(norm.bands))
    return norm


class PatchDataset(Dataset[dict[str, Any]]):
    """Random patches of a catalog, indexed by ``(epoch, i)`` (or ``i``, meaning epoch 0).

    Args:
        catalog: the input (see :func:`~explora_geo.data.catalog.build_catalog`).
        patch_size: side in pixels.
        length: samples per epoch.
        seed: base seed.
        normalization: applied last (bands must match ``catalog.bands``); ``None`` keeps digital numbers
            (minus the catalog's DN offset when the normalisation does not carry one).
        max_nodata_fraction: reject patches with more missing pixels than this (0..1).
        roi: optional region of interest (one-row GeoSeries).
        fast: read through :class:`~explora_geo.data.fast.PatchReader` (direct windowed reads) instead of
            torchgeo datasets.
        max_open_files: files the fast reader keeps open per process (default: a quarter of ``ulimit -n``).
        max_draws: draws before giving up on a sample (then the data is declared nodata).
        rows: optional band of rows (fractions of each unit's height) the patches lie in (:class:`WindowSampler`).

    Each item: ``image`` float32 ``[C, H, W]`` (filled, normalised), ``valid_mask`` bool ``[H, W]``,
    ``index`` int64 ``[2]`` = (epoch, i), ``rejected`` int64 (redraws needed), ``source`` int64 (unit).
    """

    def __init__(self, catalog: Catalog, *, patch_size: int, length: int, seed: int = 0,
                 normalization: Normalization | None = None, max_nodata_fraction: float = 0.5, roi: Any = None,
                 fast: bool = True, max_open_files: int | None = None, max_draws: int = 100,
                 rows: tuple[float, float] | None = None) -> None:
        if not 0.0 <= max_nodata_fraction <= 1.0:
            raise ExploraGeoError(f"max_nodata_fraction {max_nodata_fraction} is not in [0, 1].")
        if length < 1:
            raise ExploraGeoError(f"samples per epoch {length} is not positive.")
        self.catalog = catalog
        self.patch_size = patch_size
        self.length = length
        self.seed = seed
        self.normalization = _with_offset(normalization, catalog)
        self.max_nodata_fraction = max_nodata_fraction
        self.max_draws = max_draws
        self.fast = fast
        self.windows = WindowSampler(catalog.sources, patch_size, roi, rows=rows)
        self._reader: Any = None
        self._datasets: dict[str, Any] = {}
        if fast:
            from explora_geo.data.fast import PatchReader

            self._reader = PatchReader(catalog.sources, max_open_files=max_open_files)

    def __len__(self) -> int:
        return self.length

    @property
    def reader(self) -> Any:
        """The fast path's :class:`~explora_geo.data.fast.PatchReader` (``None`` on the torchgeo path)."""
        return self._reader

    def read(self, window: Window) -> np.ndarray:
        """Raw pixels ``[C, size, size]`` (digital numbers) of ``window``."""
        if self.fast:
            return self._reader.read(window.source, window.row, window.col, window.size, window.size)
        return self._read_torchgeo(window)

    def torchgeo_dataset(self, index: int) -> Any:
        """The torchgeo dataset that reads unit ``index``: every unit sharing its grid's CRS, in that CRS at
        the catalog's GSD (:meth:`Catalog.crs_views`), so files already on such a grid are not resampled."""
        key = self.catalog.sources[index].crs.to_wkt()
        if key not in self._datasets:
            from explora_geo.data.datasets import open_dataset

            view = next(v for v in self.catalog.crs_views() if v.crs.to_wkt() == key)
            self._datasets[key] = open_dataset(catalog=view)
        return self._datasets[key]

    def _read_torchgeo(self, window: Window) -> np.ndarray:
        """torchgeo's sample for the bounds of ``window`` on its unit's grid, ``[C, size, size]`` float32.

        torchgeo keeps open files in a process-wide cache; it is emptied whenever it holds more than
        :func:`~explora_geo.data.fast.default_max_open` files, and running out of descriptors is reported as
        such."""
        from explora_geo.data.fast import default_max_open, too_many_files_error

        ds, source = self.torchgeo_dataset(window.source), self.catalog.sources[window.source]
        xres, yres = abs(source.transform.a), abs(source.transform.e)
        left, top = source.transform @ (window.col, window.row)
        cached = type(ds)._cached_load_warp_file
        try:
            sample = ds[left:left + window.size * xres:xres, top - window.size * yres:top:yres]
        except Exception as err:
            cached.cache_clear()
            error = too_many_files_error(source.files[0], err)
            if error is not None:
                raise error from err
            raise
        if cached.cache_info().currsize > default_max_open():
            cached.cache_clear()  # closes the handles (and their warped views) once nothing else holds them
        return sample["image"].numpy()

    def draw(self, epoch: int, i: int) -> tuple[Window, np.ndarray, np.ndarray, int]:
        """``(window, raw pixels, valid mask, rejections)`` of sample ``i`` of ``epoch``.

        Raises:
            ExploraGeoError: no acceptable patch in ``max_draws`` draws (the data is (nearly) all nodata).
        """
        for attempt in range(self.max_draws):
            rng = np.random.default_rng([self.seed, epoch, i, attempt])
            window = self.windows.draw(rng)
            raw = self.read(window)
            valid = valid_mask(raw, self.catalog.nodata)
            if nodata_fraction(valid) <= self.max_nodata_fraction and valid.any():
                return window, raw, valid, attempt
        raise ExploraGeoError(
            f"no patch with at most {self.max_nodata_fraction:.0%} nodata (value {self.catalog.nodata}) in "
            f"{self.max_draws} draws; the data is (nearly) all nodata: check the files, the nodata value or "
            "the region of interest."
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (0, int(key))
        window, raw, valid, rejected = self.draw(epoch, i)
        image = fill_nodata(raw, valid)
        if self.normalization is not None:
            image = self.normalization(image)
        elif self.catalog.offset:
            image = image - np.float32(self.catalog.offset)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "valid_mask": torch.from_numpy(valid),
            "index": torch.tensor([epoch, i], dtype=torch.long),
            "rejected": torch.tensor(rejected, dtype=torch.long),
            "source": torch.tensor(window.source, dtype=torch.long),
        }

    def close(self) -> None:
        """Release this process's file handles (before forking workers, for instance)."""
        if self._reader is not None:
            self._reader.close()
        for ds in self._datasets.values():
            # torchgeo caches open handles in a process-wide lru_cache; drop them so no fork inherits one
            type(ds)._cached_load_warp_file.cache_clear()
        self._datasets = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_datasets={})
        return state

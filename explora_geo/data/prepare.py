"""``prepare_store``: cut patches of a :class:`~explora_geo.data.catalog.Catalog` into a LitData patch store.

How patches are cut:

- The catalog's units are grouped by CRS (a geographic file's unit carries its local UTM CRS, see
  :mod:`explora_geo.data.catalog`), and each group is one torchgeo dataset
  (:class:`~explora_geo.data.datasets.MosaicDataset` / ``BandFilesDataset``) in that CRS at the group's GSD:
  projected files are read on their own grid (no warping); a geographic file is resampled into its UTM zone.
- ``sampler="random"``: the requested patches are split between the groups in proportion to their area
  (inside the region of interest), and each group draws its share with torchgeo's ``RandomPatchSampler``.
  ``sampler="grid"``: torchgeo's ``GriddedPatchSampler`` positions of every group; when there are more than
  ``patches``, a seeded random subset of ``patches`` of them (kept in grid order).
- A patch with more than ``max_nodata_fraction`` missing pixels is rejected (dropped and counted), so a
  store holds ``written = requested - rejected - unreadable`` patches.
- A file that fails to decode (corrupt, truncated) is skipped: its patches are counted as ``unreadable`` and
  the file is named in the summary; a file whose header cannot be read is skipped before sampling
  (:func:`catalog_skipping_unreadable`).

Work: the patch positions are drawn in this process, then split into shards of ``shard_size`` positions;
``litdata.optimize`` runs :class:`_ShardWriter` over the shards in ``workers`` processes and writes the chunks.
Each shard also leaves a small report (counts, failed files and its band-statistics accumulator) that this
process merges into the store's ``stats.json``, ``explora-store.json`` and the returned summary.

Completeness: a folder store is built in a hidden ``.<name>.partial-*`` folder beside ``out`` and renamed onto
``out`` once its metadata is written; at a URL the metadata file is uploaded last, and readers refuse a store
without it. A full disk or an error removes the partial folder.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explora_geo.data.catalog import Catalog, DataSpec, Source, build_catalog, find_rasters, inspect_raster
from explora_geo.data.nodata import nodata_fraction, valid_mask
from explora_geo.data.stats import BandAccumulator
from explora_geo.data.store import (
    METADATA_FILE,
    STATS_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    is_url,
    url_exists,
    write_store_file,
)
from explora_geo.errors import ExploraGeoError

__all__ = ["catalog_skipping_unreadable", "check_store_target", "default_workers", "prepare_store"]

#: torchgeo keeps open file handles per process in an LRU of 128; a worker clears it beyond this many.
MAX_OPEN_FILES = 32


def default_workers() -> int:
    """Worker processes used when none are given: the CPU count (at least 1)."""
    return max(1, os.cpu_count() or 1)


def catalog_skipping_unreadable(data: DataSpec, **kwargs: Any) -> tuple[Catalog, list[dict[str, str]]]:
    """:func:`~explora_geo.data.catalog.build_catalog` over the rasters of ``data`` whose header reads.

    Returns ``(catalog, skipped)`` where ``skipped`` lists ``{"path", "error"}`` of the files left out.

    Raises:
        ExploraGeoError: no readable raster, or what ``build_catalog`` raises for the rest.
    """
    readable, skipped = [], []
    for path in find_rasters(data):
        try:
            inspect_raster(path)
            readable.append(path)
        except ExploraGeoError as err:
            skipped.append({"path": path, "error": str(err)})
    if not readable:
        raise ExploraGeoError(f"no readable raster in {data} ({len(skipped)} unreadable, e.g. "
                              f"{skipped[0]['path']}); check the files." if skipped else f"no raster in {data}.")
    return build_catalog(readable, **kwargs), skipped


# ----------------------------------------------------------------------------------------------------------
# Planning (in the calling process)
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Group:
    """One CRS: its torchgeo dataset, the catalog units in it, and the patch positions drawn in it."""

    crs: Any
    res: tuple[float, float]
    sources: list[Source]
    dataset: Any = None
    area: float = 0.0
    boxes: np.ndarray | None = None  # [N, 4] (xmin, xmax, ymin, ymax) in crs


def _crs_groups(catalog: Catalog) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for source in catalog.sources:
        key = source.crs.to_wkt()
        res = (abs(source.transform.a), abs(source.transform.e))
        group = groups.setdefault(key, _Group(source.crs, res, []))
        group.sources.append(source)
        group.res = (min(group.res[0], res[0]), min(group.res[1], res[1]))
    return list(groups.values())


def _roi_series(roi: Any) -> Any:
    if roi is None:
        return None
    if isinstance(roi, (str, os.PathLike)):
        from explora_geo.data.sampling import load_roi

        return load_roi(roi)
    return roi  # a one-row GeoSeries with a CRS


def _open_group(catalog: Catalog, group: _Group) -> Any:
    from explora_geo.data.datasets import BandFilesDataset, MosaicDataset

    sub = dataclasses.replace(catalog, sources=group.sources, crs=group.crs, res=group.res)
    cls = BandFilesDataset if catalog.kind == "band_files" else MosaicDataset
    return cls(catalog=sub)


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainders get the rest)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


def _plan(catalog: Catalog, patches: int, patch_size: int, sampler: str, roi: Any, seed: int
          ) -> tuple[list[_Group], list[dict[str, Any]]]:
    """Per-CRS datasets and patch positions; also the units too small for a patch (not sampled)."""
    import shapely
    from torchgeo.samplers import GriddedPatchSampler, RandomPatchSampler

    too_small = [{"name": s.name, "size_px": [s.width, s.height]} for s in catalog.sources
                 if s.width < patch_size or s.height < patch_size]
    if len(too_small) == len(catalog.sources):
        largest = max(catalog.sources, key=lambda s: s.width * s.height)
        raise ExploraGeoError(
            f"patch size {patch_size} px is larger than every input (largest: {largest.name}, {largest.width} x "
            f"{largest.height} px at the target GSD); pass a smaller --patch-size."
        )
    small = {t["name"] for t in too_small}
    groups = []
    for group in _crs_groups(catalog):
        group.sources = [s for s in group.sources if s.name not in small]
        if group.sources:
            groups.append(group)
    roi_series = _roi_series(roi)
    for group in groups:
        group.dataset = _open_group(catalog, group)
        geometry = group.dataset.index.geometry.union_all()
        if roi_series is not None:
            geometry = geometry & roi_series.to_crs(group.dataset.crs).iloc[0]
        group.area = float(shapely.area(geometry))
    if sum(g.area for g in groups) <= 0:
        raise ExploraGeoError("the region of interest does not overlap the data; check the ROI file and its CRS.")
    roi_of = (lambda g: roi_series.to_crs(g.dataset.crs).iloc[0]) if roi_series is not None else (lambda g: None)
    if sampler == "random":
        for k, (group, n) in enumerate(zip(groups, _largest_remainder(patches, [g.area for g in groups]),
                                           strict=True)):
            if n == 0:
                group.boxes = np.zeros((0, 4))
                continue
            s = RandomPatchSampler(group.dataset, size=patch_size, length=n, roi=roi_of(group),
                                   generator=np.random.default_rng([seed, k]))
            if s.series.iloc[0].is_empty:  # torchgeo erodes by half the patch diagonal
                raise ExploraGeoError(
                    f"no room for random {patch_size} px patches in the files in {group.crs.to_string()} "
                    f"(the sampler needs about 1.42 x the patch side inside the data or ROI); pass a smaller "
                    "--patch-size or --sampler grid."
                )
            group.boxes = np.array([(x.start, x.stop, y.start, y.stop) for x, y in s], dtype=np.float64)
    elif sampler == "grid":
        for group in groups:
            s = GriddedPatchSampler(group.dataset, size=patch_size, roi=roi_of(group))
            group.boxes = np.array([(x.start, x.stop, y.start, y.stop) for x, y in s],
                                   dtype=np.float64).reshape(-1, 4)
        total = sum(len(g.boxes) for g in groups)
        if total > patches:
            keep = np.sort(np.random.default_rng(seed).choice(total, patches, replace=False))
            start = 0
            for group in groups:
                mine = keep[(keep >= start) & (keep < start + len(group.boxes))] - start
                start += len(group.boxes)
                group.boxes = group.boxes[mine]
    else:
        raise ExploraGeoError(f"sampler {sampler!r} is not 'random' or 'grid'; pass one of them.")
    for group in groups:
        _snap(group)
    return groups, too_small


def _snap(group: _Group) -> None:
    """Move each box (by less than a pixel) onto the grid of the unit under its centre.

    torchgeo's samplers round positions to the grid of the union's bounds, which is not a file's own grid when
    files are offset or a warped footprint sets the union's corner; snapped, the centre file is read without
    resampling.
    """
    import shapely

    boxes = group.boxes
    if boxes is None or not len(boxes):
        return
    index = group.dataset.index
    by_path = {s.channels[0][0]: s for s in group.sources}
    centres = shapely.points((boxes[:, 0] + boxes[:, 1]) / 2, (boxes[:, 2] + boxes[:, 3]) / 2)
    hit_box, hit_file = index.sindex.query(centres, predicate="intersects")
    first = {}
    for b, f in zip(hit_box.tolist(), hit_file.tolist(), strict=True):
        first.setdefault(b, f)
    for b, f in first.items():
        t = by_path[str(index.iloc[f]["filepath"])].transform
        xres, yres = abs(t.a), abs(t.e)
        width, height = boxes[b, 1] - boxes[b, 0], boxes[b, 3] - boxes[b, 2]
        left = t.c + round((boxes[b, 0] - t.c) / xres) * xres
        top = t.f - round((t.f - boxes[b, 3]) / yres) * yres
        boxes[b] = (left, left + width, top - height, top)


# ----------------------------------------------------------------------------------------------------------
# Work (in LitData's worker processes)
# ----------------------------------------------------------------------------------------------------------

class _ShardWriter:
    """LitData ``fn``: for one shard ``(group, shard id, boxes [N, 4])`` yield the accepted patches and leave
    a report ``shard-<id>.npz`` in ``reports`` (written, rejected, unreadable, failed files, statistics)."""

    def __init__(self, datasets: list[Any], crs: list[str], files: list[str], scene_files: dict[str, list[str]],
                 nodata: float | None, offset: float, max_nodata_fraction: float, shard_size: int, keep: int,
                 seed: int, reports: str) -> None:
        self.datasets, self.crs, self.files = datasets, crs, files
        self.scene_files = scene_files
        self.nodata, self.offset = nodata, offset
        self.max_nodata_fraction = max_nodata_fraction
        self.shard_size, self.keep, self.seed = shard_size, keep, seed
        self.reports = reports
        self.bad: dict[str, str] = {}  # file -> error, per worker process
        self._dtypes: dict[str, np.dtype] = {}
        self._file_index = {p: i for i, p in enumerate(files)}

    def _dtype(self, path: str) -> np.dtype:
        if path not in self._dtypes:
            import rasterio

            with rasterio.open(path) as src:
                self._dtypes[path] = np.dtype(src.dtypes[0])
        return self._dtypes[path]

    def _hits(self, ds: Any, box: np.ndarray) -> tuple[list[str], str]:
        """Indexed files intersecting ``box`` and the one holding its centre."""
        import shapely

        xmin, xmax, ymin, ymax = box
        idx = ds.index.sindex.query(shapely.box(xmin, ymin, xmax, ymax), predicate="intersects")
        paths = [str(ds.index.iloc[int(i)]["filepath"]) for i in sorted(idx)]
        centre = shapely.Point((xmin + xmax) / 2, (ymin + ymax) / 2)
        inside = [p for i, p in zip(sorted(idx), paths, strict=True)
                  if ds.index.geometry.iloc[int(i)].covers(centre)]
        return paths, (inside or paths)[0]

    def _culprit(self, ds: Any, crs: Any, paths: list[str], box: np.ndarray) -> str | None:
        """The first file under ``box`` whose window fails to decode on its own."""
        import rasterio
        from rasterio.warp import transform_bounds
        from rasterio.windows import Window, from_bounds

        xmin, xmax, ymin, ymax = box
        for indexed in paths:
            for path in self.scene_files.get(indexed, [indexed]):
                try:
                    with rasterio.open(path) as src:
                        bounds = transform_bounds(crs, src.crs, xmin, ymin, xmax, ymax)
                        window = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
                        window = window.intersection(Window(0, 0, src.width, src.height))
                        src.read(window=window)
                except Exception:  # noqa: BLE001 - any decoding error marks the file
                    return path
        return None

    def _read(self, g: int, box: np.ndarray, paths: list[str]) -> np.ndarray:
        """Pixels ``[C, H, W]`` (float32 digital numbers) of ``box`` through the group's torchgeo dataset."""
        ds = self.datasets[g]
        xmin, xmax, ymin, ymax = box
        try:
            return ds[xmin:xmax, ymin:ymax]["image"].numpy()
        except Exception as err:
            from rasterio.crs import CRS

            culprit = self._culprit(ds, CRS.from_string(self.crs[g]), paths, box) or paths[0]
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            self.bad[culprit] = f"{type(err).__name__}: {first}"
            raise
        finally:
            cached = type(ds)._cached_load_warp_file
            if cached.cache_info().currsize > MAX_OPEN_FILES:
                cached.cache_clear()  # bounded open handles per worker (closed when released)

    def __call__(self, shard: tuple[int, int, np.ndarray]) -> Any:
        g, shard_id, boxes = shard
        acc = BandAccumulator(len(self.datasets[0].bands), self.keep)
        written = rejected = unreadable = 0
        for j, box in enumerate(boxes):
            paths, source = self._hits(self.datasets[g], box)
            scene = [f for p in paths for f in self.scene_files.get(p, [p])]
            if any(f in self.bad for f in scene):
                unreadable += 1
                continue
            try:
                pixels = self._read(g, box, paths)
            except Exception:  # noqa: BLE001 - recorded in self.bad by _read
                unreadable += 1
                continue
            raw = _to_dtype(pixels, self._dtype(source))
            valid = valid_mask(raw, self.nodata)
            if nodata_fraction(valid) > self.max_nodata_fraction or not valid.any():
                rejected += 1
                continue
            patch_id = shard_id * self.shard_size + j
            acc.add(raw, valid, self.offset, np.random.default_rng([self.seed, patch_id]))
            written += 1
            # the path as UTF-8 bytes: LitData would read a str ending in .tif as an image file
            yield {"image": raw, "valid_mask": valid, "source": source.encode(),
                   "source_index": self._file_index.get(source, -1), "crs": self.crs[g],
                   "bounds": np.array([box[0], box[2], box[1], box[3]], dtype=np.float64), "patch_id": patch_id}
        tmp = os.path.join(self.reports, f".shard-{shard_id:08d}.{os.getpid()}.npz")
        np.savez(tmp, written=written, rejected=rejected, unreadable=unreadable, boxes=len(boxes),
                 failed=json.dumps(self.bad), **acc.state())
        os.replace(tmp, os.path.join(self.reports, f"shard-{shard_id:08d}.npz"))


def _to_dtype(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """torchgeo's float32 pixels back in the file's dtype (integers rounded and clipped to the type's range)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(pixels), info.min, info.max).astype(dtype)
    return pixels.astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------

def check_store_target(out: str, overwrite: bool, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse an existing store or a non-empty folder at ``out`` unless ``overwrite`` (an unreachable URL too)."""
    if is_url(out):
        if url_exists(out.rstrip("/") + "/" + METADATA_FILE, storage_options) and not overwrite:
            raise ExploraGeoError(f"store {out} already exists; pass --overwrite or another --out.")
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ExploraGeoError(f"--out {out} is a file; pass a folder path for the store.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExploraGeoError(f"--out {out} already exists and is not empty; pass --overwrite or another --out.")


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    return "No space left on device" in text or "Errno 28" in text


def _worker_error(err: BaseException) -> ExploraGeoError | None:
    """The ExploraGeoError a LitData worker raised (LitData re-raises it as a RuntimeError with the text)."""
    match = re.search(r"ExploraGeoError: (.+)", str(err))
    return ExploraGeoError(match.group(1).strip()) if match else None


def _progress(reports: str, total: int, sizes: dict[int, int], enabled: bool) -> tuple[Callable[[], None], Any]:
    """A tqdm bar fed by a thread counting the shard reports; returns ``(stop, bar)``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="prepare", unit="patch", disable=not enabled)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            finished = [int(n[6:14]) for n in os.listdir(reports) if n.startswith("shard-")]
            bar.n = sum(sizes.get(k, 0) for k in finished)
            bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return stop, bar


def _merge_reports(reports: str, channels: int, keep: int) -> tuple[dict[str, int], dict[str, str], BandAccumulator]:
    counts = {"written": 0, "rejected": 0, "unreadable": 0, "boxes": 0}
    failed: dict[str, str] = {}
    acc = BandAccumulator(channels, keep)
    for name in sorted(os.listdir(reports)):
        if not name.startswith("shard-"):
            continue
        with np.load(os.path.join(reports, name)) as report:
            for key in counts:
                counts[key] += int(report[key])
            failed.update(json.loads(str(report["failed"])))
            acc.merge(BandAccumulator.from_state(report))
    return counts, failed, acc


def _bytes_of(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def prepare_store(
    catalog: Catalog,
    out: str | os.PathLike[str],
    *,
    patches: int,
    patch_size: int,
    sampler: str = "random",
    roi: Any = None,
    max_nodata_fraction: float = 0.5,
    workers: int | None = None,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    skipped_files: Sequence[dict[str, str]] = (),
    shard_size: int = 64,
    chunk_bytes: str | int = "64MB",
    max_pixels: int = 2_000_000,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cut ``patches`` patches of ``patch_size`` px from ``catalog`` into a LitData store at ``out``.

    Args:
        catalog: the input (from :func:`~explora_geo.data.catalog.build_catalog`, STAC items, ...).
        out: a folder, or an object-store URL (``s3://``, ``gs://``, ``r2://``).
        patches: patches to draw (``random``) or the most grid positions to keep (``grid``).
        patch_size: patch side in pixels at the catalog's GSD.
        sampler: ``"random"`` (torchgeo ``RandomPatchSampler``) or ``"grid"`` (``GriddedPatchSampler``).
        roi: region of interest: a vector file path or a one-row GeoSeries with a CRS.
        max_nodata_fraction: patches with more missing pixels are rejected (0..1).
        workers: LitData worker processes (default: the CPU count).
        seed: seed of the patch positions.
        provenance: free-form JSON-ready facts stored in the metadata (e.g. the STAC query).
        overwrite: replace an existing store at ``out``.
        skipped_files: files already left out by the caller (``{"path", "error"}``), reported in the summary.
        shard_size: patch positions per LitData work item (and per progress step).
        chunk_bytes: LitData chunk size.
        max_pixels: pixels per band kept for the percentiles.
        storage_options: object-store options passed to LitData (endpoint, credentials).
        progress: show a progress bar.

    Returns:
        the summary: ``store``, ``patches_requested`` / ``patches_written`` / ``patches_rejected`` /
        ``patches_unreadable``, ``files_skipped`` (``[{"path", "error"}]``), ``units_too_small``, ``groups``
        (per CRS: files, area, patches), ``bytes``, ``seconds``, ``patches_per_s``.

    Raises:
        ExploraGeoError: bad arguments, an existing ``out`` without ``overwrite``, an unreachable URL, a patch
            larger than every file, a full disk (the partial store is removed), nothing written.
    """
    import litdata

    started = time.perf_counter()
    out = os.fspath(out)
    if int(patches) < 1:
        raise ExploraGeoError(f"--patches {patches}: a store needs at least 1 patch; pass e.g. --patches 10000.")
    if int(patch_size) < 1:
        raise ExploraGeoError(f"--patch-size {patch_size} is not positive; pass a size in pixels, e.g. 224.")
    if not 0.0 <= max_nodata_fraction <= 1.0:
        raise ExploraGeoError(f"--max-nodata-fraction {max_nodata_fraction} is not in [0, 1].")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ExploraGeoError(f"--workers {workers} must be at least 1.")
    if int(os.environ.get("DATA_OPTIMIZER_NUM_NODES", "1")) > 1:
        raise ExploraGeoError("several prepare nodes (DATA_OPTIMIZER_NUM_NODES > 1) are not supported by this "
                              "version; prepare on one machine (all its cores through --workers).")
    check_store_target(out, overwrite, storage_options)
    groups, too_small = _plan(catalog, int(patches), int(patch_size), sampler, roi, seed)

    shards: list[tuple[int, int, np.ndarray]] = []
    for g, group in enumerate(groups):
        assert group.boxes is not None
        for start in range(0, len(group.boxes), shard_size):
            shards.append((g, len(shards), group.boxes[start:start + shard_size]))
    requested = sum(len(s[2]) for s in shards)
    if requested == 0:
        raise ExploraGeoError("no patch position inside the data; check the ROI, --patch-size and --patches.")
    scene_files = {s.channels[0][0]: s.files for s in catalog.sources}
    keep = max(1, max_pixels // requested)
    staging = Path(tempfile.mkdtemp(prefix="explora-prepare-")) if is_url(out) else \
        Path(out).absolute().parent / f".{Path(out).name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    reports = staging / "reports"
    target = out if is_url(out) else str(staging / "store")
    writer = _ShardWriter(
        [g.dataset for g in groups], [g.crs.to_string() for g in groups], catalog.files, scene_files,
        catalog.nodata, catalog.offset, max_nodata_fraction, shard_size, keep, seed, str(reports))
    try:
        reports.mkdir(parents=True)
        stop, bar = _progress(str(reports), requested, {s[1]: len(s[2]) for s in shards}, progress)
        method = multiprocessing.get_start_method(allow_none=True)
        try:  # LitData starts its workers with "spawn" (and sets it process-wide: restored below)
            litdata.optimize(writer, shards, target, chunk_bytes=chunk_bytes, num_workers=min(workers, len(shards)),
                             mode="overwrite", verbose=False, reorder_files=False,
                             storage_options=storage_options or {})
        finally:
            multiprocessing.set_start_method(method, force=True)
            stop()
            bar.close()
        done = sum(1 for n in os.listdir(reports) if n.startswith("shard-"))
        if done != len(shards):
            raise ExploraGeoError(
                f"the prepare workers finished only {done} of {len(shards)} shards (a worker died: out of memory, "
                "or a script calling prepare_store without `if __name__ == \"__main__\":`); fix that and run again."
            )
        counts, failed, acc = _merge_reports(str(reports), len(catalog.bands), keep)
        skipped = list(skipped_files) + [{"path": p, "error": e} for p, e in sorted(failed.items())]
        if counts["written"] == 0:
            raise ExploraGeoError(
                f"no patch written: {counts['rejected']} of {requested} had more than {max_nodata_fraction:.0%} "
                f"nodata (value {catalog.nodata}) and {counts['unreadable']} were unreadable; check the files, "
                "--nodata, --max-nodata-fraction or the ROI."
            )
        gsd = tuple(catalog.gsd) if catalog.gsd and min(catalog.gsd) > 0 else groups[0].res
        stats = acc.to_stats(bands=catalog.bands, patches=counts["written"], patch_size=int(patch_size),
                             rejected=counts["rejected"], nodata=catalog.nodata, dn_offset=catalog.offset,
                             files=len(catalog.files), seed=seed)
        group_info = [{"crs": g.crs.to_string(), "units": len(g.sources), "area_km2": g.area / 1e6,
                       "patches": len(g.boxes)} for g in groups]  # type: ignore[arg-type]
        meta = {
            "format": STORE_FORMAT, "format_version": STORE_VERSION,
            "bands": list(catalog.bands), "patch_size": int(patch_size),
            "gsd_m": gsd[0] if abs(gsd[0] - gsd[1]) < 1e-9 * gsd[0] else list(gsd),
            "sensor": catalog.sensor.name if catalog.sensor is not None else None,
            "nodata": catalog.nodata, "dn_offset": catalog.offset, "kind": catalog.kind,
            "sampler": sampler, "seed": seed, "max_nodata_fraction": max_nodata_fraction,
            "counts": {"requested": requested, "written": counts["written"], "rejected": counts["rejected"],
                       "unreadable": counts["unreadable"]},
            "files": catalog.files, "files_skipped": skipped, "units_too_small": too_small, "groups": group_info,
            "stats": stats, "provenance": provenance or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_store_file(target, STATS_FILE, json.dumps(stats, indent=2) + "\n", storage_options)
        write_store_file(target, METADATA_FILE, json.dumps(meta, indent=2) + "\n", storage_options)  # last
        size = None
        if not is_url(out):
            size = _bytes_of(target)
            _publish(Path(target), Path(out))
    except BaseException as err:
        if _is_disk_full(err):
            free = shutil.disk_usage(staging.parent if staging.parent.exists() else "/").free
            shutil.rmtree(staging, ignore_errors=True)
            raise ExploraGeoError(f"disk full while writing the store for {out} ({free / 2**20:.0f} MiB free); "
                                  "free some space or pass another --out (the partial store was removed).") from err
        shutil.rmtree(staging, ignore_errors=True)
        inner = _worker_error(err) if isinstance(err, RuntimeError) else None
        if inner is not None:
            raise inner from err
        raise
    shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    return {
        "store": out, "patches_requested": requested, "patches_written": counts["written"],
        "patches_rejected": counts["rejected"], "patches_unreadable": counts["unreadable"],
        "files_skipped": skipped, "units_too_small": too_small, "groups": group_info,
        "bands": list(catalog.bands), "patch_size": int(patch_size), "bytes": size,
        "seconds": round(seconds, 2), "patches_per_s": round(counts["written"] / seconds, 2),
    }


def _publish(built: Path, out: Path) -> None:
    """Move the finished store ``built`` onto ``out`` (an existing ``out`` is replaced)."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(built, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built, out)


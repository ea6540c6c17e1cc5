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

Several nodes (LitData's multi-node optimize, ``DATA_OPTIMIZER_NUM_NODES`` / ``DATA_OPTIMIZER_NODE_RANK``): every
node plans the same positions and LitData gives each its share of the shards. In a folder each node writes its
chunks in its own ``OUT/.explora-prepare/node-R`` and moves them into ``OUT``; every node leaves its report (and
chunk index) in ``OUT/.explora-prepare/`` (:class:`_NodeBoard`); the last node, LitData's merging node, merges the
indexes with LitData's merge and writes the metadata once. A failing node leaves ``node-R.failed``, deletes
nothing, and the others stop with an error on seeing it or after ``EXPLORA_PREPARE_NODE_TIMEOUT_S``.

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
import sys
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
    INDEX_FILE,
    METADATA_FILE,
    NODES_DIR,
    STATS_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    _join,
    _provider,
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
    """One CRS: its catalog view (:meth:`Catalog.crs_views`, units too small for a patch left out), its
    torchgeo dataset, and the patch positions drawn in it."""

    view: Catalog
    dataset: Any = None
    area: float = 0.0
    boxes: np.ndarray | None = None  # [N, 4] (xmin, xmax, ymin, ymax) in crs

    @property
    def crs(self) -> Any:
        return self.view.crs

    @property
    def sources(self) -> list[Source]:
        return self.view.sources


def _roi_series(roi: Any) -> Any:
    if roi is None:
        return None
    if isinstance(roi, (str, os.PathLike)):
        from explora_geo.data.sampling import load_roi

        return load_roi(roi)
    return roi  # a one-row GeoSeries with a CRS


def _open_group(catalog: Catalog, group: _Group) -> Any:
    from explora_geo.data.datasets import BandFilesDataset, MosaicDataset

    cls = BandFilesDataset if catalog.kind == "band_files" else MosaicDataset
    return cls(catalog=group.view)


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
    for view in catalog.crs_views():
        sources = [s for s in view.sources if s.name not in small]
        if sources:
            groups.append(_Group(dataclasses.replace(view, sources=sources)))
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
        self._parent_pid = os.getpid()
        self._threads_limited = False

    def _limit_threads(self) -> None:
        """One torch thread per worker process: the work is spread over processes, and torch's intra-op threads
        (one per core in every worker) fight over the cores; measured 2.1x faster per patch (docs/data.md)."""
        if not self._threads_limited and os.getpid() != self._parent_pid:  # never the caller's own process
            import torch

            torch.set_num_threads(1)
            self._threads_limited = True

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
        self._limit_threads()
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
        np.savez(tmp, written=written, rejected=rejected, unreadable=unreadable, boxes=len(boxes), shards=1,
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
    """Refuse an existing store or a non-empty folder at ``out`` unless ``overwrite`` (an unreachable URL too).

    On one of several nodes (``DATA_OPTIMIZER_NUM_NODES`` > 1) the folder is shared and may already hold the
    other nodes' work: then only a finished store, ``overwrite`` and this node's notes of an earlier run are
    refused."""
    nodes, node = _nodes()
    if nodes > 1:
        _check_node_target(out, node, _NodeBoard(out, storage_options), overwrite, storage_options)
        return
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


_COUNTS = ("written", "rejected", "unreadable", "boxes", "shards")


def _merge_reports(reports: str, channels: int, keep: int, prefix: str = "shard-"
                   ) -> tuple[dict[str, int], dict[str, str], BandAccumulator]:
    """Sum the ``prefix*.npz`` reports in ``reports`` (shard reports, or the nodes' summed reports)."""
    counts = dict.fromkeys(_COUNTS, 0)
    failed: dict[str, str] = {}
    acc = BandAccumulator(channels, keep)
    for name in sorted(os.listdir(reports)):
        if not name.startswith(prefix) or not name.endswith(".npz"):
            continue
        with np.load(os.path.join(reports, name)) as report:
            for key in counts:
                counts[key] += int(report[key])
            failed.update(json.loads(str(report["failed"])))
            acc.merge(BandAccumulator.from_state(report))
    return counts, failed, acc


# ----------------------------------------------------------------------------------------------------------
# Several nodes (LitData's multi-node optimize)
# ----------------------------------------------------------------------------------------------------------

#: Seconds a node waits for the other nodes (their reports, or the finished store) before giving up.
NODE_TIMEOUT_ENV = "EXPLORA_PREPARE_NODE_TIMEOUT_S"
DEFAULT_NODE_TIMEOUT_S = 4 * 3600.0


def _nodes() -> tuple[int, int]:
    """``(nodes, this node's rank)`` from LitData's ``DATA_OPTIMIZER_NUM_NODES`` / ``DATA_OPTIMIZER_NODE_RANK``
    (1 and 0 when unset)."""
    try:
        nodes = int(os.environ.get("DATA_OPTIMIZER_NUM_NODES") or 1)
        node = int(os.environ.get("DATA_OPTIMIZER_NODE_RANK") or 0)
    except ValueError as err:
        raise ExploraGeoError(f"DATA_OPTIMIZER_NUM_NODES / DATA_OPTIMIZER_NODE_RANK are not integers ({err}); "
                              "set them to the node count and this node's rank (0..N-1).") from None
    if nodes < 1 or not 0 <= node < nodes:
        raise ExploraGeoError(f"DATA_OPTIMIZER_NODE_RANK={node} is not in [0, DATA_OPTIMIZER_NUM_NODES={nodes}); "
                              "give every node its own rank 0..N-1.")
    return nodes, node


def _node_timeout() -> float:
    raw = os.environ.get(NODE_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_NODE_TIMEOUT_S
    except ValueError:
        raise ExploraGeoError(f"{NODE_TIMEOUT_ENV}={raw} is not a number of seconds; set e.g. 3600.") from None
    if value <= 0:
        raise ExploraGeoError(f"{NODE_TIMEOUT_ENV}={raw} must be positive; set e.g. 3600.")
    return value


class _NodeBoard:
    """The notes the nodes of one prepare leave each other in ``OUT/.explora-prepare/`` (a folder on a shared
    file system, or under the object-store URL): per node its summed report ``node-R.npz``, its chunk index
    ``node-R-index.json`` (folders; at a URL LitData merges the indexes itself) or ``node-R.failed`` (one line)."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None) -> None:
        self.out, self.storage_options = out, storage_options
        self.url = is_url(out)
        self.root = _join(out, NODES_DIR)

    def path(self, name: str) -> str:
        return _join(self.root, name)

    def exists(self, name: str) -> bool:
        return self._exists(self.path(name))

    def _exists(self, path: str) -> bool:
        return url_exists(path, self.storage_options) if self.url else os.path.exists(path)

    def put(self, local: str, name: str) -> None:
        """Publish the local file ``local`` as ``name`` (atomically in a folder, one upload at a URL)."""
        if self.url:
            _provider(self.path(name), self.storage_options).upload_file(local, self.path(name))
            return
        os.makedirs(self.root, exist_ok=True)
        tmp = self.path(f".{name}.{os.getpid()}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, self.path(name))

    def get(self, name: str, local: str) -> None:
        if self.url:
            _provider(self.path(name), self.storage_options).download_file(self.path(name), local)
        else:
            shutil.copyfile(self.path(name), local)

    def fail(self, node: int, err: BaseException) -> None:
        """Leave ``node-R.failed`` with the error's first line (best effort: the error itself is raised anyway)."""
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:500]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "failed")
                Path(local).write_text(f"{type(err).__name__}: {line}\n", encoding="utf-8")
                self.put(local, f"node-{node:04d}.failed")
        except Exception as note_err:  # noqa: BLE001 - the original error matters more; the others time out
            print(f"could not leave the failure note of node {node} in {self.root}: {note_err}", file=sys.stderr)

    def failure(self, nodes: int) -> str | None:
        """``"node R: <its error>"`` of the first node that left a failure note, else None."""
        for r in range(nodes):
            name = f"node-{r:04d}.failed"
            if self.exists(name):
                with tempfile.TemporaryDirectory() as tmp:
                    self.get(name, os.path.join(tmp, "f"))
                    return f"node {r}: {Path(tmp, 'f').read_text(encoding='utf-8').strip()}"
        return None

    def wait(self, paths: Sequence[str], nodes: int, deadline: float, what: str) -> None:
        """Wait until every file of ``paths`` exists; raise as soon as a node failed or at ``deadline``."""
        pending = list(paths)
        while True:
            pending = [p for p in pending if not self._exists(p)]
            if not pending:
                return
            failure = self.failure(nodes)
            if failure is not None:
                raise ExploraGeoError(f"{failure}; the store at {self.out} is incomplete: fix that, delete "
                                      f"{self.out} and run prepare again on every node.")
            if time.monotonic() > deadline:
                raise ExploraGeoError(
                    f"waited {_node_timeout():g} s ({NODE_TIMEOUT_ENV}) for {what} ({pending[0]} missing: a node "
                    f"died or never started?); the store at {self.out} is incomplete: delete it and run prepare "
                    "again on every node.")
            time.sleep(1.0)


def _check_node_target(out: str, node: int, board: _NodeBoard, overwrite: bool,
                       storage_options: dict[str, Any] | None) -> None:
    """Multi-node: refuse a finished store, ``--overwrite`` and this node's notes left by an earlier run."""
    if overwrite:
        raise ExploraGeoError("--overwrite is not available when preparing on several nodes (a node would delete "
                              f"the others' work); delete {out} first and run again without it.")
    if is_url(out):
        if url_exists(_join(out, METADATA_FILE), storage_options):
            raise ExploraGeoError(f"store {out} already exists; delete it or pass another --out.")
    elif Path(out).exists() and not Path(out).is_dir():
        raise ExploraGeoError(f"--out {out} is a file; pass a folder path for the store.")
    elif (Path(out) / METADATA_FILE).exists():
        raise ExploraGeoError(f"store {out} already exists; delete it or pass another --out.")
    for suffix in (".npz", ".failed"):
        if board.exists(f"node-{node:04d}{suffix}"):
            raise ExploraGeoError(f"{board.path(f'node-{node:04d}{suffix}')} is left from an earlier prepare; "
                                  f"delete {out} and run prepare again on every node.")


def _merge_node_indexes(board: _NodeBoard, nodes: int, out: str) -> None:
    """Folder store: merge the nodes' chunk indexes into ``out/index.json`` with LitData's own index merge."""
    from litdata.streaming.cache import Cache

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(nodes):
            board.get(f"node-{r:04d}-{INDEX_FILE}", os.path.join(tmp, f"{r}-{INDEX_FILE}"))
        Cache(tmp, chunk_bytes=1)._merge_no_wait()  # {r}-index.json -> index.json, as LitData's last node does
        staged = os.path.join(out, f".{INDEX_FILE}.{os.getpid()}.tmp")
        shutil.copyfile(os.path.join(tmp, INDEX_FILE), staged)
        os.replace(staged, os.path.join(out, INDEX_FILE))


def _publish_node_chunks(built: Path, out: str, node: int, board: _NodeBoard) -> None:
    """Folder store: move this node's chunks from its own LitData output ``built`` into ``out`` and publish its
    index (``{node}-index.json``, written by LitData) as ``node-R-index.json``."""
    for chunk in sorted(built.glob("*.bin")):
        os.replace(chunk, Path(out) / chunk.name)  # names carry the global worker rank: unique across nodes
    board.put(str(built / f"{node}-{INDEX_FILE}"), f"node-{node:04d}-{INDEX_FILE}")


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
    compression: str | None = None,
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
        compression: LitData chunk compression: None or ``"zstd"`` (needs the ``zstd`` package).

    Returns:
        the summary: ``store``, ``patches_requested`` / ``patches_written`` / ``patches_rejected`` /
        ``patches_unreadable``, ``files_skipped`` (``[{"path", "error"}]``), ``units_too_small``, ``groups``
        (per CRS: files, area, patches), ``bytes``, ``seconds``, ``patches_per_s``.

    Raises:
        ExploraGeoError: bad arguments, an existing ``out`` without ``overwrite``, an unreachable URL, a patch
            larger than every file, a full disk (the partial store is removed), nothing written.
    """

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
    nodes, node = _nodes()
    if nodes == 1:
        check_store_target(out, overwrite, storage_options)
        return _prepare(catalog, out, started=started, patches=int(patches), patch_size=int(patch_size),
                        sampler=sampler, roi=roi, max_nodata_fraction=max_nodata_fraction, workers=workers, seed=seed,
                        provenance=provenance, skipped_files=skipped_files, shard_size=shard_size,
                        chunk_bytes=chunk_bytes, max_pixels=max_pixels, storage_options=storage_options,
                        progress=progress, compression=compression)
    board = _NodeBoard(out, storage_options)
    check_store_target(out, overwrite, storage_options)
    deadline_s = _node_timeout()
    try:
        return _prepare(catalog, out, started=started, patches=int(patches), patch_size=int(patch_size),
                        sampler=sampler, roi=roi, max_nodata_fraction=max_nodata_fraction, workers=workers, seed=seed,
                        provenance=provenance, skipped_files=skipped_files, shard_size=shard_size,
                        chunk_bytes=chunk_bytes, max_pixels=max_pixels, storage_options=storage_options,
                        progress=progress, compression=compression, nodes=nodes, node=node, board=board,
                        node_timeout_s=deadline_s)
    except BaseException as err:
        board.fail(node, err)  # the other nodes stop waiting and report it; nothing of theirs is deleted
        if isinstance(err, ExploraGeoError) and "is incomplete" not in str(err):
            raise ExploraGeoError(f"node {node} of {nodes}: {str(err).rstrip('.')}; the store at {out} is "
                                  f"incomplete: delete it and run prepare again on every node.") from err
        raise


def _prepare(catalog: Catalog, out: str, *, started: float, patches: int, patch_size: int, sampler: str, roi: Any,
             max_nodata_fraction: float, workers: int, seed: int, provenance: dict[str, Any] | None,
             skipped_files: Sequence[dict[str, str]], shard_size: int, chunk_bytes: str | int, max_pixels: int,
             storage_options: dict[str, Any] | None, progress: bool, compression: str | None, nodes: int = 1,
             node: int = 0, board: _NodeBoard | None = None, node_timeout_s: float = DEFAULT_NODE_TIMEOUT_S
             ) -> dict[str, Any]:
    """:func:`prepare_store` after the argument checks: plan, write this node's share, and (on the merging node,
    the last one as in LitData) gather the nodes' reports and write the metadata."""
    import litdata

    groups, too_small = _plan(catalog, patches, patch_size, sampler, roi, seed)
    shards: list[tuple[int, int, np.ndarray]] = []
    for g, group in enumerate(groups):
        assert group.boxes is not None
        for start in range(0, len(group.boxes), shard_size):
            shards.append((g, len(shards), group.boxes[start:start + shard_size]))
    requested = sum(len(s[2]) for s in shards)
    if requested == 0:
        raise ExploraGeoError("no patch position inside the data; check the ROI, --patch-size and --patches.")
    if len(shards) < nodes:
        raise ExploraGeoError(f"{len(shards)} shard(s) of {shard_size} patches for {nodes} nodes; prepare more "
                              "patches or on fewer nodes.")
    scene_files = {s.channels[0][0]: s.files for s in catalog.sources}
    keep = max(1, max_pixels // requested)
    multi = board is not None
    merging = node == nodes - 1  # LitData's last node merges the chunk indexes; it also writes the metadata
    if is_url(out) or multi:  # several nodes: each writes its chunks in its own folder first
        staging = Path(tempfile.mkdtemp(prefix="explora-prepare-"))
    else:
        staging = Path(out).absolute().parent / f".{Path(out).name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    reports = staging / "reports"
    if is_url(out):
        target = out
    elif multi:  # on the shared file system beside the store, so the chunks move in with a rename
        target = _join(board.root, f"node-{node:04d}")  # type: ignore[union-attr]
        shutil.rmtree(target, ignore_errors=True)  # this node's own leftovers only
    else:
        target = str(staging / "store")
    writer = _ShardWriter(
        [g.dataset for g in groups], [g.crs.to_string() for g in groups], catalog.files, scene_files,
        catalog.nodata, catalog.offset, max_nodata_fraction, shard_size, keep, seed, str(reports))
    saved_env = {k: os.environ.get(k) for k in ("DATA_OPTIMIZER_CACHE_FOLDER",)}
    try:
        reports.mkdir(parents=True)
        stop, bar = _progress(str(reports), requested, {s[1]: len(s[2]) for s in shards}, progress)
        method = multiprocessing.get_start_method(allow_none=True)
        if multi:  # LitData merges index files found in its cache folder: one of its own per node
            os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(staging / "litdata-cache")
        try:  # LitData starts its workers with "spawn" (and sets it process-wide: restored below)
            litdata.optimize(writer, shards, target, chunk_bytes=chunk_bytes,
                             num_workers=min(workers, -(-len(shards) // nodes)),
                             # several nodes: "append" keeps LitData from clearing what is already there
                             mode="append" if multi else "overwrite", verbose=False, reorder_files=False,
                             compression=compression, storage_options=storage_options or {})
        finally:
            multiprocessing.set_start_method(method, force=True)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            stop()
            bar.close()
        counts, failed, acc = _merge_reports(str(reports), len(catalog.bands), keep)
        if multi:
            assert board is not None
            if not is_url(out):
                _publish_node_chunks(Path(target), out, node, board)
            local = str(staging / "node.npz")
            np.savez(local, failed=json.dumps(failed), **counts, **acc.state())
            board.put(local, f"node-{node:04d}.npz")
            deadline = time.monotonic() + node_timeout_s
            if not merging:
                board.wait([_join(out, METADATA_FILE)], nodes, deadline, f"node {nodes - 1} to finish the store")
                seconds = time.perf_counter() - started
                return {"store": out, "node": node, "nodes": nodes, "patches_requested": requested,
                        "node_patches_written": counts["written"], "node_patches_rejected": counts["rejected"],
                        "node_patches_unreadable": counts["unreadable"], "seconds": round(seconds, 2),
                        "node_patches_per_s": round(counts["written"] / seconds, 2)}
            names = [f"node-{r:04d}.npz" for r in range(nodes)]
            board.wait([board.path(n) for n in names], nodes, deadline, "the other nodes' reports")
            gathered = staging / "nodes"
            gathered.mkdir()
            for name in names:
                board.get(name, str(gathered / name))
            counts, failed, acc = _merge_reports(str(gathered), len(catalog.bands), keep, prefix="node-")
            if not is_url(out):
                _merge_node_indexes(board, nodes, out)
        if counts["shards"] != len(shards):
            raise ExploraGeoError(
                f"the prepare workers finished only {counts['shards']} of {len(shards)} shards (a worker died: out "
                "of memory, or a script calling prepare_store without `if __name__ == \"__main__\":`); fix that "
                "and run again."
            )
        skipped = list(skipped_files) + [{"path": p, "error": e} for p, e in sorted(failed.items())]
        if counts["written"] == 0:
            raise ExploraGeoError(
                f"no patch written: {counts['rejected']} of {requested} had more than {max_nodata_fraction:.0%} "
                f"nodata (value {catalog.nodata}) and {counts['unreadable']} were unreadable; check the files, "
                "--nodata, --max-nodata-fraction or the ROI."
            )
        gsd = tuple(catalog.gsd) if catalog.gsd and min(catalog.gsd) > 0 else groups[0].view.res
        stats = acc.to_stats(bands=catalog.bands, patches=counts["written"], patch_size=patch_size,
                             rejected=counts["rejected"], nodata=catalog.nodata, dn_offset=catalog.offset,
                             files=len(catalog.files), seed=seed)
        group_info = [{"crs": g.crs.to_string(), "units": len(g.sources), "area_km2": g.area / 1e6,
                       "patches": len(g.boxes)} for g in groups]  # type: ignore[arg-type]
        meta = {
            "format": STORE_FORMAT, "format_version": STORE_VERSION,
            "bands": list(catalog.bands), "patch_size": patch_size,
            "gsd_m": gsd[0] if abs(gsd[0] - gsd[1]) < 1e-9 * gsd[0] else list(gsd),
            "sensor": catalog.sensor.name if catalog.sensor is not None else None,
            "nodata": catalog.nodata, "dn_offset": catalog.offset, "kind": catalog.kind,
            "sampler": sampler, "seed": seed, "max_nodata_fraction": max_nodata_fraction,
            "compression": compression, "nodes": nodes,
            "counts": {"requested": requested, "written": counts["written"], "rejected": counts["rejected"],
                       "unreadable": counts["unreadable"]},
            "files": catalog.files, "files_skipped": skipped, "units_too_small": too_small, "groups": group_info,
            "stats": stats, "provenance": provenance or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store_folder = out if multi else target
        write_store_file(store_folder, STATS_FILE, json.dumps(stats, indent=2) + "\n", storage_options)
        if multi and not is_url(out):
            shutil.rmtree(board.root, ignore_errors=True)  # type: ignore[union-attr]  # every node is done
        write_store_file(store_folder, METADATA_FILE, json.dumps(meta, indent=2) + "\n", storage_options)  # last
        size = None
        if not is_url(out):
            size = _bytes_of(store_folder)
            if not multi:
                _publish(Path(target), Path(out))
    except BaseException as err:
        if _is_disk_full(err):
            free = shutil.disk_usage(staging.parent if staging.parent.exists() else "/").free
            shutil.rmtree(staging, ignore_errors=True)
            what = "this node's partial work is left for the others to see" if multi else "the partial store was removed"
            raise ExploraGeoError(f"disk full while writing the store for {out} ({free / 2**20:.0f} MiB free); "
                                  f"free some space or pass another --out ({what}).") from err
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
        "bands": list(catalog.bands), "patch_size": patch_size, "bytes": size, "compression": compression,
        "seconds": round(seconds, 2), "patches_per_s": round(counts["written"] / seconds, 2),
        **({"nodes": nodes} if multi else {}),
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


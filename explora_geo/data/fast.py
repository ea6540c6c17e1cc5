"""Fast patch reads for pre-training: windowed reads on each unit's own grid and a decoded block cache.

Why: decoding compressed tiles (DEFLATE, JPEG2000) is the bottleneck of random patch sampling, and
pre-training revisits the same mosaic for many epochs. :class:`PatchReader` therefore

- reads a patch from ONE unit (file or per-band scene) on that unit's own grid: a plain windowed read when
  the file's grid is the unit grid (no warping), a resampled read (bilinear, like torchgeo) otherwise;
- keeps, per unit, an uncompressed memory-mapped ``.npy`` of the requested bands, filled lazily block by block
  along the file's internal tiles; a ``.done`` flag per block says which blocks hold decoded pixels, so every
  later patch touching that block costs a memory copy. Pixels are written before their flag, so a reader
  never sees a flagged block that is not fully written; two workers decoding the same block write identical
  bytes. File creation is serialised with ``flock`` and made atomic with ``os.replace``;
- bounds the cache: units are cached in order while their decoded size fits ``cache_bytes``; the rest are read
  directly; entries of other or changed inputs are pruned, least recently used first, to keep the folder
  within ``cache_bytes``;
- opens file handles lazily in each process (keyed by pid), never using one inherited from a parent.

The cached pixels are those of the direct read of the same block, and a patch equals torchgeo's read of the
same window (tested).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explora_geo.data.catalog import Source
from explora_geo.errors import ExploraGeoError

__all__ = ["PatchReader", "default_cache_dir", "prune_cache", "read_window"]

_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/explora-geo/blocks`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "explora-geo" / "blocks"


def _open(path: str) -> Any:
    import rasterio
    from rasterio.errors import RasterioError

    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise ExploraGeoError(f"cannot read {path} ({err}); replace or remove the file.") from err


def read_window(
    source: Source, handles: dict[str, Any], row: int, col: int, height: int, width: int
) -> np.ndarray:
    """Pixels ``[C, height, width]`` of ``source`` (file dtype) for the window at ``(row, col)`` of its grid.

    Files whose grid is the unit grid are read directly; others (a 20 m band of a 10 m scene, a file at a
    different resolution than requested) are resampled bilinearly from the same bounds, as
    ``rasterio.merge`` does for torchgeo. ``handles`` maps paths to open datasets (filled on demand).
    """
    from rasterio.enums import Resampling
    from rasterio.windows import Window, from_bounds
    from rasterio.windows import bounds as window_bounds

    window = Window(col, row, width, height)
    groups: dict[str, list[int]] = {}
    for path, band in source.channels:
        groups.setdefault(path, []).append(band)
    parts: dict[tuple[str, int], np.ndarray] = {}
    for path, bands in groups.items():
        src = handles.get(path)
        if src is None:
            src = handles[path] = _open(path)
        indexes = list(dict.fromkeys(bands))
        same_grid = (src.width, src.height) == (source.width, source.height)
        if same_grid and src.transform.almost_equals(source.transform):
            data = src.read(indexes, window=window)
        else:
            src_window = from_bounds(*window_bounds(window, source.transform), src.transform)
            data = src.read(indexes, window=src_window, out_shape=(len(indexes), height, width),
                            resampling=Resampling.bilinear)
        for k, band in enumerate(indexes):
            parts[path, band] = data[k]
    return np.stack([parts[c] for c in source.channels])


_MIN_BLOCK = 256


def _cache_block(source: Source) -> tuple[int, int]:
    """Cache block ``(rows, cols)``: whole file tiles (or strips), grouped to at least 256 px a side, so a
    block read stays tile-aligned and small tiles (e.g. 64 px JPEG2000 code blocks) do not mean many reads."""

    def grow(size: int, limit: int) -> int:
        size = max(size, 1)
        return min(size * math.ceil(_MIN_BLOCK / size), limit)

    rows, cols = source.block
    return grow(rows, source.height), grow(cols, source.width)


def _cache_key(source: Source, dtype: str) -> str:
    stats = []
    for path in source.files:
        st = os.stat(path)
        stats.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    payload = json.dumps([_CACHE_VERSION, source.channels, stats, list(source.transform)[:6], source.width,
                          source.height, dtype, _cache_block(source)], default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


class _UnitCache:
    """Memory-mapped decoded pixels ``[C, H, W]`` of one unit plus one done-flag per block."""

    def __init__(self, folder: Path, source: Source, dtype: str) -> None:
        self.block = _cache_block(source)
        self.grid = (math.ceil(source.height / self.block[0]), math.ceil(source.width / self.block[1]))
        key = _cache_key(source, dtype)
        data_path, flag_path = folder / f"{key}.npy", folder / f"{key}.done.npy"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{key}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not flag_path.exists():
                    shape = (len(source.channels), source.height, source.width)
                    for path, dt, shp in ((data_path, dtype, shape), (flag_path, "uint8", self.grid)):
                        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
                        os.close(fd)
                        np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=shp).flush()
                        os.replace(tmp, path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.data = np.load(data_path, mmap_mode="r+")
        self.done = np.load(flag_path, mmap_mode="r+")
        os.utime(flag_path)  # last use, for least-recently-used pruning

    def read(self, source: Source, handles: dict[str, Any], row: int, col: int, h: int, w: int) -> np.ndarray:
        """The window, decoding (and caching) the blocks it touches that are not cached yet."""
        bh, bw = self.block
        for by in range(row // bh, (row + h - 1) // bh + 1):
            for bx in range(col // bw, (col + w - 1) // bw + 1):
                if not self.done[by, bx]:
                    r0, c0 = by * bh, bx * bw
                    r1, c1 = min(r0 + bh, source.height), min(c0 + bw, source.width)
                    self.data[:, r0:r1, c0:c1] = read_window(source, handles, r0, c0, r1 - r0, c1 - c0)
                    self.done[by, bx] = 1
        view = self.data[:, row:row + h, col:col + w]
        view.flags.writeable = False  # flagged blocks are immutable; callers copy when they transform
        return view


def _disk_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512  # allocated bytes: cache files are sparse until filled
    except FileNotFoundError:
        return 0


def prune_cache(folder: Path, keep: set[str], budget: int) -> list[str]:
    """Delete least-recently-used cache entries not in ``keep`` until the others use at most ``budget`` bytes.

    Entries of units that changed (new size/mtime) or belong to other inputs are candidates. A process still
    mapping a deleted entry keeps its mapping (POSIX), so pruning is safe while other runs read.

    Returns:
        the keys deleted.
    """
    if not folder.exists():
        return []
    for tmp in folder.glob("*.tmp"):  # left by a process killed while creating an entry
        if time.time() - tmp.stat().st_mtime > 3600:
            tmp.unlink(missing_ok=True)
    entries = []
    for flag in folder.glob("*.done.npy"):
        key = flag.name[: -len(".done.npy")]
        if key not in keep:
            entries.append((flag.stat().st_mtime, key, _disk_bytes(folder / f"{key}.npy") + _disk_bytes(flag)))
    used = sum(e[2] for e in entries)
    removed = []
    for _, key, size in sorted(entries):
        if used <= max(budget, 0):
            break
        for suffix in (".done.npy", ".npy", ".lock"):
            (folder / f"{key}{suffix}").unlink(missing_ok=True)
        used -= size
        removed.append(key)
    return removed


class PatchReader:
    """Reads windows of :class:`Source` units, through a bounded decoded-block cache.

    Args:
        sources: the units (from :class:`~explora_geo.data.catalog.Catalog`).
        cache_dir: folder of the cache (default :func:`default_cache_dir`); ``None`` with ``cache_bytes=0``
            disables caching.
        cache_bytes: most bytes of decoded pixels to keep on disk (default: half the free space of the
            cache folder's disk, at most 64 GiB). ``0``: no cache.
    """

    def __init__(self, sources: Sequence[Source], *, cache_dir: str | os.PathLike[str] | None = None,
                 cache_bytes: int | None = None) -> None:
        self.sources = list(sources)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._dtypes = [self._dtype(s) for s in self.sources]
        if cache_bytes is None:
            probe = self.cache_dir if self.cache_dir.exists() else self.cache_dir.parent
            while not probe.exists():
                probe = probe.parent
            cache_bytes = min(shutil.disk_usage(probe).free // 2, 64 << 30)
        self.cache_bytes = int(cache_bytes)
        self.cached = self._plan()
        if any(self.cached):
            keep = {_cache_key(s, d) for s, d, c in zip(self.sources, self._dtypes, self.cached, strict=True) if c}
            prune_cache(self.cache_dir, keep, self.cache_bytes - self.cached_bytes)
        self._pid = -1
        self._handles: dict[str, Any] = {}
        self._caches: dict[int, _UnitCache] = {}

    @staticmethod
    def _dtype(source: Source) -> str:
        import rasterio

        with rasterio.open(source.channels[0][0]) as src:
            return str(src.dtypes[source.channels[0][1] - 1])

    def _plan(self) -> list[bool]:
        """Which units are cached: in order, while their decoded size fits the budget."""
        used, plan = 0, []
        for source, dtype in zip(self.sources, self._dtypes, strict=True):
            size = len(source.channels) * source.width * source.height * np.dtype(dtype).itemsize
            fits = used + size <= self.cache_bytes
            used += size if fits else 0
            plan.append(fits)
        return plan

    @property
    def cached_bytes(self) -> int:
        """Decoded bytes the cache may hold (sum over cached units)."""
        return sum(len(s.channels) * s.width * s.height * np.dtype(d).itemsize
                   for s, d, c in zip(self.sources, self._dtypes, self.cached, strict=True) if c)

    def _ensure_process(self) -> None:
        if self._pid != os.getpid():  # fresh process (or a forked worker): never reuse inherited handles
            self._pid, self._handles, self._caches = os.getpid(), {}, {}

    def read(self, index: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Pixels ``[C, height, width]`` (file dtype) of unit ``index`` at window ``(row, col)`` of its grid.

        From a cached unit this is a read-only view of the memory map (copy it to keep or modify it)."""
        self._ensure_process()
        source = self.sources[index]
        if row < 0 or col < 0 or row + height > source.height or col + width > source.width:
            raise IndexError(f"window ({row}, {col}, {height}, {width}) outside unit {source.name}")
        if not self.cached[index]:
            return read_window(source, self._handles, row, col, height, width)
        cache = self._caches.get(index)
        if cache is None:
            try:
                cache = self._caches[index] = _UnitCache(self.cache_dir, source, self._dtypes[index])
            except OSError as err:
                raise ExploraGeoError(
                    f"cannot use the cache folder {self.cache_dir} ({err}); pass a writable cache_dir, "
                    "or cache_bytes=0 to read without a cache."
                ) from err
        return cache.read(source, self._handles, row, col, height, width)

    def close(self) -> None:
        """Close this process's file handles and cache maps."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._pid, self._handles, self._caches = -1, {}, {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pid=-1, _handles={}, _caches={})
        return state

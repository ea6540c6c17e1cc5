"""On-the-fly patch reads: windowed reads on each unit's own grid through a bounded pool of file handles.

:class:`PatchReader` reads a patch from ONE unit (a mosaic file or a per-band scene) on that unit's grid
(see :class:`~explora_geo.data.catalog.Source`):

- a plain windowed read when the file's grid is the unit grid (no warping: a file in another UTM zone stays
  in its zone);
- a bilinear resampled read of the same bounds when the file is in the unit's CRS at another pixel size (a
  20 m band of a 10 m scene), as ``rasterio.merge`` does for torchgeo;
- a bilinear warp (a GDAL ``WarpedVRT`` on the unit grid) when the file is in a geographic CRS and the unit
  grid is its local UTM zone; pixels outside the file's footprint are nodata.

Open files live in a :class:`HandlePool` per process: at most ``max_open`` at a time, least recently used
closed first, opened lazily in the process that reads (never inherited from a parent). Running out of file
descriptors anyway is reported as such (raise ``ulimit -n`` or use fewer workers), never as a bad file.

There is no decoded-pixel cache: repeated epochs over a corpus are what ``explora-geo prepare`` (the patch
store) is for; docs/data.md records the measurement behind that choice.
"""

from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from explora_geo.data.catalog import Source
from explora_geo.errors import ExploraGeoError

__all__ = ["HandlePool", "PatchReader", "default_max_open", "open_raster", "read_window", "too_many_files_error"]


def _nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_max_open() -> int:
    """Files one process keeps open: a quarter of its descriptor limit (``ulimit -n``), within 4..256.

    The rest stays free for what else a DataLoader worker opens (shared-memory tensors, pipes, libraries).
    """
    soft = _nofile_limit()
    if soft == resource.RLIM_INFINITY:
        return 256
    return int(min(max(soft // 4, 4), 256))


def _too_many_files(path: str) -> bool:
    """Whether opening ``path`` fails because this process has no descriptor left (EMFILE/ENFILE)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        return err.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


def too_many_files_error(path: str, cause: BaseException) -> ExploraGeoError | None:
    """The one-line error for ``cause`` when it came from a descriptor shortage (checked by opening ``path``
    again), else ``None``."""
    return _emfile_error(path, cause) if _too_many_files(path) else None


def _emfile_error(path: str, cause: BaseException) -> ExploraGeoError:
    soft = _nofile_limit()
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    return ExploraGeoError(
        f"too many open files in this process (limit {shown}) while opening {path}; raise the limit "
        f"(e.g. `ulimit -n 4096`) or use fewer DataLoader workers ({type(cause).__name__})."
    )


def open_raster(path: str) -> Any:
    """``rasterio.open(path)`` with honest errors: a descriptor shortage is not blamed on the file.

    Raises:
        ExploraGeoError: no descriptor left (the fix: ``ulimit -n`` / fewer workers), or the file is unreadable.
    """
    import rasterio
    from rasterio.errors import RasterioError

    try:
        return rasterio.open(path)
    except (RasterioError, OSError) as err:
        shortage = too_many_files_error(path, err)
        if shortage is not None:
            raise shortage from err
        raise ExploraGeoError(f"cannot read {path} ({err}); replace or remove the file.") from err


class _Handle:
    """An open file and, when it is read through a warp onto the unit grid, the ``WarpedVRT`` over it."""

    def __init__(self, path: str, source: Source) -> None:
        self.src = open_raster(path)
        self.vrt = None
        if self.src.crs != source.crs:
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT

            try:
                self.vrt = WarpedVRT(self.src, crs=source.crs, transform=source.transform, width=source.width,
                                     height=source.height, resampling=Resampling.bilinear,
                                     src_nodata=self.src.nodata, nodata=source.nodata)
            except Exception:
                self.src.close()
                raise

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.src.close()


class HandlePool:
    """Open rasters of one process, at most ``max_open`` (least recently used closed first).

    Args:
        max_open: the bound (default :func:`default_max_open`).
    """

    def __init__(self, max_open: int | None = None) -> None:
        self.max_open = int(max_open) if max_open is not None else default_max_open()
        if self.max_open < 1:
            raise ExploraGeoError(f"max_open_files {max_open} is not positive; pass at least 1.")
        self._open: OrderedDict[str, _Handle] = OrderedDict()
        self.opened = 0  # files opened so far (a reopen after eviction counts again)

    def __len__(self) -> int:
        return len(self._open)

    def get(self, path: str, source: Source) -> _Handle:
        """The open handle of ``path`` for reads on ``source``'s grid (opened, evicting the oldest, if needed)."""
        handle = self._open.get(path)
        if handle is not None:
            self._open.move_to_end(path)
            return handle
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].close()
        handle = self._open[path] = _Handle(path, source)
        self.opened += 1
        return handle

    def close(self) -> None:
        """Close every handle."""
        while self._open:
            self._open.popitem(last=False)[1].close()


def read_window(source: Source, pool: HandlePool, row: int, col: int, height: int, width: int) -> np.ndarray:
    """Pixels ``[C, height, width]`` of ``source`` (file dtype) for the window at ``(row, col)`` of its grid.

    See the module docstring for the three kinds of read; ``pool`` provides the open files.
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
        handle = pool.get(path, source)
        indexes = list(dict.fromkeys(bands))
        src = handle.vrt if handle.vrt is not None else handle.src
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


class PatchReader:
    """Reads windows of :class:`Source` units, with a bounded pool of file handles per process.

    Args:
        sources: the units (from :class:`~explora_geo.data.catalog.Catalog`).
        max_open_files: files kept open per process (default :func:`default_max_open`).
    """

    def __init__(self, sources: Sequence[Source], *, max_open_files: int | None = None) -> None:
        self.sources = list(sources)
        self.max_open_files = max_open_files
        HandlePool(max_open_files)  # validates the bound here, not in a worker
        self._pid = -1
        self._pool: HandlePool | None = None

    @property
    def pool(self) -> HandlePool:
        """This process's handle pool (a fresh one in a new or forked process: inherited handles are unsafe)."""
        if self._pid != os.getpid() or self._pool is None:
            self._pid, self._pool = os.getpid(), HandlePool(self.max_open_files)
        return self._pool

    def read(self, index: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Pixels ``[C, height, width]`` (file dtype) of unit ``index`` at window ``(row, col)`` of its grid."""
        source = self.sources[index]
        if row < 0 or col < 0 or row + height > source.height or col + width > source.width:
            raise IndexError(f"window ({row}, {col}, {height}, {width}) outside unit {source.name}")
        return read_window(source, self.pool, row, col, height, width)

    def close(self) -> None:
        """Close this process's file handles."""
        if self._pid == os.getpid() and self._pool is not None:
            self._pool.close()
        self._pid, self._pool = -1, None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pid=-1, _pool=None)
        return state

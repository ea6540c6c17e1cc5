"""Patch throughput, cold and warm: stock torchgeo vs the on-the-fly path vs a prepared patch store.

Data (generated, seeded, removed at the end): 4 tiled (512 px) DEFLATE GeoTIFFs, 13-band uint16, SIZE x SIZE
px (default 4096), two in UTM 32N and two in UTM 33N.

1. **prepare**: ``explora_geo.data.prepare.prepare_store`` cuts PATCHES patches of 224 px (torchgeo samplers,
   one per CRS) into a LitData store with ``workers`` processes; timed (patches/s) and sized (bytes per patch).
2. The store's patch positions (each sample's CRS and bounds) are the patches of EVERY side, so all sides read
   the same patches, bands, patch size, batch size and worker count:

   - **torchgeo**: stock ``torchgeo.datasets.RasterDataset`` over the folder (it takes the first file's CRS and
     warps the other zone's files) indexed with each patch's box in its CRS (the other zone's patches: the
     box of the same size around the patch centre, snapped to the dataset's pixel grid), ``stack_samples``;
   - **on the fly**: ``explora_geo.data.sampling.PatchDataset`` (what ``PretrainDataModule`` reads with) on
     the same windows of each file's own grid (a stored patch straddling two files of one CRS, which torchgeo
     merges, becomes the window of the same size shifted inside the file holding its centre);
   - **store**: ``explora_geo.data.streaming.StoreDataModule`` (what ``pretrain --data STORE`` reads with:
     LitData ``StreamingDataset`` + ``StreamingDataLoader``, shuffled).

   Every side yields float32 ``[B, 13, 224, 224]`` batches (the on-the-fly and store sides also fill nodata
   and return the valid mask, as pre-training uses them).
3. **cold**: before each cold pass the pages of every file that pass reads (source rasters, store chunks) are
   evicted with ``posix_fadvise(DONTNEED)``; **warm**: the same pass again right after. On every side a pass
   creates its loader inside the timed section, so worker start-up counts.

Last line: ``store_cold_vs_torchgeo=<x> onthefly_cold_vs_torchgeo=<y> store_warm_vs_torchgeo=<z>`` (patches/s
over stock torchgeo's patches/s, cold over cold, warm over warm). Targets: x >= 10, y >= 2. Each pass also
prints its CPU milliseconds per patch (this process plus its exited loader workers), which depend much less
on other load than patches/s do.
Usage: ``python benchmarks/sampling.py [--quick] [--size PX] [--patches N] [--workers N] [--batch N]
[--no-store]`` (``--no-store``: torchgeo and on the fly only, on patches drawn by the on-the-fly sampler).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
MEANS = [1370, 1184, 1120, 1136, 1263, 1645, 1846, 1762, 1972, 582, 15, 1732, 1247]


def generate(folder: Path, size: int, seed: int = 0, block: int = 512) -> list[Path]:
    """4 smooth-but-noisy 13-band uint16 tiled DEFLATE GeoTIFFs in two UTM zones (2 x 2 per zone)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    paths = []
    layout = [("EPSG:32632", 600000, 5300000), ("EPSG:32632", 600000 + size * 10, 5300000),
              ("EPSG:32633", 300000, 5300000), ("EPSG:32633", 300000 + size * 10, 5300000)]
    x = np.arange(size, dtype=np.float32)
    for n, (crs, left, top) in enumerate(layout):
        path = folder / f"mosaic_{n}.tif"
        profile = dict(driver="GTiff", width=size, height=size, count=13, dtype="uint16", crs=crs,
                       transform=from_origin(left, top, 10.0, 10.0), tiled=True, blockxsize=block,
                       blockysize=block, compress="deflate", interleave="pixel")
        freqs = rng.uniform(0.002, 0.02, (13, 4))
        phases = rng.uniform(0, 6.28, (13, 4))
        with rasterio.open(path, "w", **profile) as dst:
            for r0 in range(0, size, block):
                y = np.arange(r0, min(r0 + block, size), dtype=np.float32)
                chunk = np.empty((13, y.size, size), dtype=np.uint16)
                for k in range(13):
                    f, p = freqs[k], phases[k]
                    hills = np.outer(np.sin(f[0] * y + p[0]), np.cos(f[1] * x + p[1]))
                    field = (MEANS[k] + 0.25 * MEANS[k] * hills
                             + 0.15 * MEANS[k] * np.sin(f[2] * y + p[2])[:, None]
                             + 0.15 * MEANS[k] * np.cos(f[3] * x + p[3])[None, :])
                    noise = rng.integers(-40, 40, size=field.shape, dtype=np.int16)
                    chunk[k] = np.clip(field + noise, 1, 65535).astype(np.uint16)
                dst.write(chunk, window=((r0, r0 + y.size), (0, size)))
            dst.descriptions = tuple(BANDS)
        paths.append(path)
    return paths


def evict(paths: Iterable[Path]) -> int:
    """Drop the page-cache pages of ``paths`` (no root needed); returns the bytes concerned."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished children (loader workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_pass(make_loader: Any, count: int) -> tuple[float, float, float]:
    """(patches/s, seconds, CPU ms per patch) of one pass: the loader (and its workers) is created inside
    the timing; CPU time counts the workers once they have exited (the loader is released first)."""
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    seen = 0
    loader = make_loader()
    for batch in loader:
        image = batch["image"]
        assert image.dtype == torch.float32 and image.shape[1:] == (13, PATCH, PATCH), (image.dtype, image.shape)
        seen += int(image.shape[0])
    elapsed = time.perf_counter() - start
    del loader, batch
    gc.collect()
    assert seen == count, (seen, count)
    assert not multiprocessing.active_children(), "loader workers still running: their CPU time would be missed"
    return seen / elapsed, elapsed, (cpu_seconds() - cpu0) * 1000 / seen


def cold_and_warm(name: str, make_loader: Any, count: int, files: list[Path]) -> tuple[float, float, float]:
    """(cold patches/s, warm patches/s, cold CPU ms per patch), printed."""
    evicted = evict(files)
    cold, cold_s, cold_cpu = timed_pass(make_loader, count)
    warm, warm_s, warm_cpu = timed_pass(make_loader, count)
    print(f"{name}: cold {cold:.1f} patches/s ({cold_s:.1f} s, {cold_cpu:.0f} CPU ms/patch, "
          f"{evicted / 2**20:.0f} MiB evicted first); warm {warm:.1f} patches/s ({warm_s:.1f} s, "
          f"{warm_cpu:.0f} CPU ms/patch)", flush=True)
    return cold, warm, cold_cpu


PATCH = 224


# ------------------------------------------------------------------------------------------------ positions
def store_positions(store: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    """``(crs, (xmin, ymin, xmax, ymax))`` of every stored patch, in store order."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(store))
    out = []
    for i in range(len(ds)):
        item = ds[i]
        out.append((str(item["crs"]), tuple(float(v) for v in np.asarray(item["bounds"]))))
    return out


def drawn_positions(catalog: Any, count: int, seed: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """``(crs, bounds)`` of ``count`` windows drawn by the on-the-fly sampler (for ``--no-store``)."""
    from rasterio.windows import Window as RWindow
    from rasterio.windows import bounds

    from explora_geo.data.sampling import WindowSampler

    sampler = WindowSampler(catalog.sources, PATCH)
    out = []
    for i in range(count):
        w = sampler.draw(np.random.default_rng([seed, 0, i, 0]))
        source = catalog.sources[w.source]
        out.append((source.crs.to_string(), bounds(RWindow(w.col, w.row, w.size, w.size), source.transform)))
    return out


def unit_windows(catalog: Any, positions: list[tuple[str, tuple[float, ...]]]) -> list[Any]:
    """The on-the-fly windows (unit, row, col) of the stored patches."""
    from rasterio.crs import CRS

    from explora_geo.data.sampling import Window

    windows = []
    for crs, (xmin, ymin, xmax, ymax) in positions:
        target = CRS.from_user_input(crs)
        for k, source in enumerate(catalog.sources):
            col, row = ~source.transform @ ((xmin + xmax) / 2, (ymin + ymax) / 2)  # the patch centre
            if source.crs == target and 0 <= col < source.width and 0 <= row < source.height:
                # torchgeo's patches may straddle two files of a CRS; ours stay in one (shifted inside it)
                r = min(max(round(row - PATCH / 2), 0), source.height - PATCH)
                c = min(max(round(col - PATCH / 2), 0), source.width - PATCH)
                windows.append(Window(k, r, c, PATCH))
                break
        else:
            raise AssertionError(f"no unit holds the stored patch {crs} {xmin, ymin, xmax, ymax}")
    return windows


def torchgeo_boxes(ds: Any, positions: list[tuple[str, tuple[float, ...]]]) -> list[tuple[slice, slice]]:
    """Boxes of the stored patches in the stock dataset's CRS (centre mapped, snapped to its pixel grid)."""
    from pyproj import CRS, Transformer

    xres, yres = ds.res
    xmin0, ymax0 = ds.bounds[0].start, ds.bounds[1].stop
    boxes = []
    transformers: dict[str, Any] = {}
    for crs, (xmin, ymin, xmax, ymax) in positions:
        cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
        if CRS.from_user_input(crs) != ds.crs:
            if crs not in transformers:
                transformers[crs] = Transformer.from_crs(CRS.from_user_input(crs), ds.crs, always_xy=True)
            cx, cy = transformers[crs].transform(cx, cy)
        left = xmin0 + round((cx - PATCH / 2 * xres - xmin0) / xres) * xres
        top = ymax0 - round((ymax0 - (cy + PATCH / 2 * yres)) / yres) * yres
        boxes.append((slice(left, left + PATCH * xres), slice(top - PATCH * yres, top)))
    return boxes


# ------------------------------------------------------------------------------------------------ sides
class FixedWindows(torch.utils.data.Dataset):
    """The on-the-fly dataset item (:meth:`PatchDataset.__getitem__`'s read, mask, fill) for given windows."""

    def __init__(self, dataset: Any, windows: list[Any]) -> None:
        self.dataset, self.windows = dataset, windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from explora_geo.data.nodata import fill_nodata, valid_mask

        raw = self.dataset.read(self.windows[i])
        valid = valid_mask(raw, self.dataset.catalog.nodata)
        return {"image": torch.from_numpy(fill_nodata(raw, valid)), "valid_mask": torch.from_numpy(valid)}


def main() -> None:
    global PATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024-px files and 64 patches (a smoke run)")
    parser.add_argument("--size", type=int, default=None, help="file side in pixels (default 4096; quick 1024)")
    parser.add_argument("--patches", type=int, default=None, help="patches per pass (default 480; quick 64)")
    parser.add_argument("--patch", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmpdir", default=None, help="where to generate (default: the system temp folder)")
    parser.add_argument("--no-store", action="store_true",
                        help="skip the store (torchgeo and on-the-fly sides on patches drawn by the on-the-fly sampler)")
    args = parser.parse_args()
    size = args.size or (1024 if args.quick else 4096)
    patches = args.patches or (64 if args.quick else 480)
    PATCH = args.patch
    workers, batch = args.workers, args.batch
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")

    from torchgeo.datasets import RasterDataset, stack_samples

    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.prepare import prepare_store
    from explora_geo.data.sampling import PatchDataset
    from explora_geo.data.streaming import StoreDataModule

    root = Path(tempfile.mkdtemp(prefix="explora-geo-bench-", dir=args.tmpdir))
    try:
        data, store = root / "data", root / "store"
        data.mkdir()
        t0 = time.perf_counter()
        files = generate(data, size, args.seed)
        mib = sum(f.stat().st_size for f in files) / 2**20
        raw_mib = 4 * 13 * size * size * 2 / 2**20
        print(f"generated 4 x 13 x {size}^2 uint16 in two UTM zones ({raw_mib:.0f} MiB raw, {mib:.0f} MiB "
              f"DEFLATE) in {time.perf_counter() - t0:.1f} s", flush=True)

        catalog = build_catalog(data, bands=BANDS)
        if args.no_store:
            positions = drawn_positions(catalog, patches, args.seed)
            print(f"--no-store: {len(positions)} patches drawn by the on-the-fly sampler; every side reads these")
        else:
            evict(files)
            summary = prepare_store(catalog, store, patches=patches, patch_size=PATCH, workers=workers,
                                    seed=args.seed, progress=False, max_nodata_fraction=1.0)
            assert int(summary["patches_written"]) == patches, summary
            chunks = [p for p in files_under(store) if p.suffix == ".bin"]
            chunk_bytes = sum(p.stat().st_size for p in chunks)
            print(f"prepare (cold sources, {workers} workers, start-up included): "
                  f"{patches / summary['seconds']:.1f} patches/s ({summary['seconds']:.1f} s); store "
                  f"{summary['bytes'] / 2**20:.1f} MiB, {chunk_bytes / patches / 1024:.0f} KiB of chunks per patch "
                  f"(raw pixels {13 * PATCH * PATCH * 2 / 1024:.0f} KiB)", flush=True)
            positions = store_positions(store)
            zones = {crs for crs, _ in positions}
            print(f"{len(positions)} stored patches in {len(zones)} CRS: every side reads these", flush=True)
        written = len(positions)

        stock = RasterDataset(paths=data)
        boxes = torchgeo_boxes(stock, positions)

        def torchgeo_loader() -> DataLoader:
            return DataLoader(stock, sampler=boxes, batch_size=batch, num_workers=workers,
                              collate_fn=stack_samples)

        tg_cold, tg_warm, tg_cpu = cold_and_warm("stock torchgeo", torchgeo_loader, written, files)

        onthefly = PatchDataset(catalog, patch_size=PATCH, length=written, normalization=None)
        fixed = FixedWindows(onthefly, unit_windows(catalog, positions))

        def onthefly_loader() -> DataLoader:
            return DataLoader(fixed, batch_size=batch, num_workers=workers)

        otf_cold, _, otf_cpu = cold_and_warm("on the fly", onthefly_loader, written, files)

        if args.no_store:
            print(f"cold CPU per patch, torchgeo over on the fly: {tg_cpu / otf_cpu:.2f}")
            print(f"onthefly_cold_vs_torchgeo={otf_cold / tg_cold:.2f} (no store: --no-store)")
            return

        def store_loader() -> Any:
            return StoreDataModule(store, bands=BANDS, batch_size=batch, num_workers=workers,
                                   seed=args.seed).train_dataloader()

        st_cold, st_warm, st_cpu = cold_and_warm("store (StoreDataModule, LitData streaming)", store_loader,
                                                 written, files_under(store))

        print(f"cold CPU per patch, torchgeo over: store {tg_cpu / st_cpu:.2f}, on the fly {tg_cpu / otf_cpu:.2f}")
        print(f"store_cold_vs_torchgeo={st_cold / tg_cold:.2f} onthefly_cold_vs_torchgeo={otf_cold / tg_cold:.2f} "
              f"store_warm_vs_torchgeo={st_warm / tg_warm:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

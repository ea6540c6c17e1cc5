"""Patch sampling throughput: stock torchgeo vs explora-geo's fast path vs raw rasterio windowed reads.

Generates (seeded) 4 tiled DEFLATE GeoTIFFs, 13-band uint16, SIZE x SIZE px (default 4096), two in UTM 32N and
two in UTM 33N, into a temporary folder (removed at the end). With 224-px patches and 2 DataLoader workers,
it measures patches/s of

1. stock torchgeo: ``RasterDataset`` + ``RandomPatchSampler`` + ``stack_samples`` (files of the other zone warped);
2. our fast path: ``PretrainDataModule(fast=True)``; epoch 1 fills the decoded-block cache and is reported
   separately; the throughput is that of epoch 2 (the steady state of multi-epoch pre-training);
3. a raw ceiling: plain ``rasterio`` windowed reads (per-worker handles) of the same windows as (2).

Last line: ``speedup_vs_torchgeo=<fast/stock> fraction_of_raw=<fast/raw>``.
Usage: ``python benchmarks/sampling.py [--quick] [--patches N] [--size PX] [--workers N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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
        # separable low-frequency "landscape" per band: rows x cols terms, plus texture noise
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


def disk_mib(folder: Path) -> float:
    """MiB allocated by the ``.npy`` files of ``folder`` (the cache files are sparse until filled)."""
    return sum(p.stat().st_blocks * 512 for p in folder.glob("*.npy")) / 2**20


def rate(loader: Any, count: int) -> tuple[float, float]:
    """(patches/s, seconds) to iterate ``loader`` (workers started inside the timing)."""
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += int(batch["image"].shape[0])
    elapsed = time.perf_counter() - start
    assert seen == count, (seen, count)
    return seen / elapsed, elapsed


def stock_torchgeo(folder: Path, patches: int, patch: int, batch: int, workers: int, seed: int) -> float:
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomPatchSampler

    dataset = RasterDataset(paths=folder)
    sampler = RandomPatchSampler(dataset, size=patch, length=patches, generator=seed)
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch, num_workers=workers, collate_fn=stack_samples)
    speed, secs = rate(loader, patches)
    print(f"stock torchgeo: {speed:.1f} patches/s ({patches} patches in {secs:.1f} s)", flush=True)
    return speed


class RawWindows(Dataset):
    """Plain rasterio windowed reads of given (path, row, col) windows; handles opened per worker process."""

    def __init__(self, windows: list[tuple[str, int, int]], patch: int) -> None:
        self.windows, self.patch = windows, patch
        self._pid, self._handles = -1, {}

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import rasterio

        if self._pid != os.getpid():
            self._pid, self._handles = os.getpid(), {}
        path, row, col = self.windows[i]
        src = self._handles.get(path) or self._handles.setdefault(path, rasterio.open(path))
        data = src.read(window=((row, row + self.patch), (col, col + self.patch)))
        return {"image": torch.from_numpy(data.astype(np.int32))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024-px files and 96 patches (a smoke run)")
    parser.add_argument("--size", type=int, default=None, help="file side in pixels (default 4096; quick 1024)")
    parser.add_argument("--patches", type=int, default=None, help="patches per reader (default 480; quick 96)")
    parser.add_argument("--patch", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmpdir", default=None, help="where to generate (default: the system temp folder)")
    args = parser.parse_args()
    size = args.size or (1024 if args.quick else 4096)
    patches = args.patches or (96 if args.quick else 480)

    from explora_geo.data import PretrainDataModule

    root = Path(tempfile.mkdtemp(prefix="explora-geo-bench-", dir=args.tmpdir))
    try:
        data, cache = root / "data", root / "cache"
        data.mkdir()
        t0 = time.perf_counter()
        files = generate(data, size, args.seed)
        mb = sum(f.stat().st_size for f in files) / 2**20
        raw_mb = 4 * 13 * size * size * 2 / 2**20
        print(f"generated 4 x 13 x {size}^2 uint16 ({raw_mb:.0f} MiB raw, {mb:.0f} MiB DEFLATE) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

        stock = stock_torchgeo(data, patches, args.patch, args.batch, args.workers, args.seed)

        dm = PretrainDataModule(data, bands=BANDS, patch_size=args.patch, batch_size=args.batch,
                                num_workers=args.workers, samples_per_epoch=patches, normalization=None,
                                seed=args.seed, cache_dir=cache)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(0)
        cold, cold_s = rate(loader, patches)
        print(f"fast path, epoch 1 (fills the cache): {cold:.1f} patches/s ({cold_s:.1f} s)", flush=True)
        loader.sampler.set_epoch(1)
        fast, fast_s = rate(loader, patches)
        print(f"fast path, epoch 2 (cached): {fast:.1f} patches/s ({fast_s:.1f} s); "
              f"cache on disk {disk_mib(cache):.0f} MiB", flush=True)
        del loader

        assert dm.dataset is not None
        windows = []
        for i in range(patches):  # epoch-2 windows (no nodata here, so the first draw is always kept)
            w = dm.dataset.windows.draw(np.random.default_rng([args.seed, 1, i, 0]))
            windows.append((dm.catalog.sources[w.source].channels[0][0], w.row, w.col))  # type: ignore[union-attr]
        raw_loader = DataLoader(RawWindows(windows, args.patch), batch_size=args.batch, num_workers=args.workers)
        raw, raw_s = rate(raw_loader, patches)
        print(f"raw rasterio windowed reads, same windows: {raw:.1f} patches/s ({raw_s:.1f} s)", flush=True)
        print(f"speedup_vs_torchgeo={fast / stock:.2f} fraction_of_raw={fast / raw:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

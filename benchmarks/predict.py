"""Overhead of ``explora-geo predict`` over bare ONNX Runtime forward passes on the same tiles.

Run in the library environment (it needs GDAL's Python bindings, as ``predict`` does):

    .venv/bin/python benchmarks/predict.py [--quick] [--model M.onnx] [--repeats 3]

The raster, the model and the bare-forward timing are those of ``benchmarks/qgis_inference.py`` (imported
from it, so both benchmarks measure the same thing, at the same sizes): a 13-band uint16 tiled, DEFLATE
GeoTIFF of 2048 x 2048 px (1024 x 1024 with ``--quick``) at 10 m built by tiling the real T33UUU scene, and
the QGIS benchmark's ViT-S sized group-channel ViT (width 384, 12 blocks, 32 px tiles). It times

- ``end_to_end``: the library's :func:`explora_geo.predict.predict` on that raster (catalog, reading with
  rasterio, value-scale check, scaling, batching, inference, GeoPackage grid and rasters written) into a fresh
  folder;
- ``forward``: ``InferenceSession.run`` alone on the same tiles, same order and batch size, each batch scaled
  into a fresh array before its timer starts.

Both are measured ``--repeats`` times, alternately, keeping the fastest. Last line:
``overhead_ratio=<end_to_end/forward>`` (target <= 1.15).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "qgis_plugin"))

from qgis_inference import all_tiles, export_bench_model, make_raster, time_forward


def time_predict(raster: Path, model_path: Path, out: Path, batch: int) -> tuple[float, float, dict]:
    """Seconds of the whole library ``predict`` (wall, and process CPU), and its summary."""
    from explora_geo.data.catalog import build_catalog
    from explora_geo.predict import PredictSettings, catalog_at_gsd, open_bundle, predict

    start, start_cpu = time.perf_counter(), time.process_time()
    model = open_bundle(model_path, "auto")
    catalog = catalog_at_gsd(lambda res: build_catalog(str(raster), bands=list(model.info.bands), res=res),
                             model.info.gsd_m)
    summary = predict(model_path, catalog, out, PredictSettings(batch_size=batch), model=model, log=lambda _: None)
    return time.perf_counter() - start, time.process_time() - start_cpu, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 x 1024 px instead of 2048 x 2048")
    parser.add_argument("--model", type=Path, default=None, help="an exported classifier (.onnx)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="alternate both measurements this many times and "
                        "keep the fastest of each (the machine is shared)")
    args = parser.parse_args()
    from explora_geo_qgis.core.model import OnnxModel

    size = 1024 if args.quick else 2048
    with tempfile.TemporaryDirectory(prefix="explora-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        raster = make_raster(work / "scene.tif", size)
        model = args.model or export_bench_model(work)
        print(f"prepared {size} x {size} px x 13 bands and the model in {time.perf_counter() - t0:.1f} s")
        tiles = all_tiles(raster, OnnxModel(model).info)
        end_to_end = forward = cpu_e2e = cpu_fwd = float("inf")
        for k in range(max(1, args.repeats)):
            seconds, cpu, summary = time_predict(raster, model, work / f"out{k}", args.batch_size)
            end_to_end, cpu_e2e = min(end_to_end, seconds), min(cpu_e2e, cpu)
            n_tiles = summary["inputs"][0]["tiles_run"]
            if n_tiles != len(tiles):
                raise SystemExit(f"predict ran {n_tiles} tiles, the raster has {len(tiles)}")
            seconds, cpu = time_forward(model, tiles, n_tiles, args.batch_size)
            forward, cpu_fwd = min(forward, seconds), min(cpu_fwd, cpu)
        print(f"tiles={n_tiles} batch={args.batch_size} provider={summary['inputs'][0]['device']}")
        print(f"cpu_s: end_to_end={cpu_e2e:.2f} forward={cpu_fwd:.2f} (process CPU time, all threads)")
        print(f"end_to_end_s={end_to_end:.2f} forward_s={forward:.2f} "
              f"tiles_per_s={n_tiles / end_to_end:.1f} forward_tiles_per_s={n_tiles / forward:.1f}")
    print(f"overhead_ratio={end_to_end / forward:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Overhead of the QGIS classify algorithm over bare ONNX Runtime forward passes.

Run in the QGIS environment (Debian python3 + QGIS, numpy, onnxruntime; no torch):

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python benchmarks/qgis_inference.py [--quick] [--model M.onnx]

It writes a 13-band uint16 GeoTIFF of 2048 x 2048 px (1024 x 1024 with ``--quick``) at 10 m, tiled (256 px
blocks) and DEFLATE-compressed as users' rasters are, built by tiling the real T33UUU scene from ../shared/data
when present (random values otherwise), then times

- ``end_to_end``: the whole ``explora_geo:classify`` algorithm through ``processing.run`` (model loading,
  reading through the data provider, scaling, batching, inference, GeoPackage grid and rasters written);
- ``forward``: ``InferenceSession.run`` alone (the plugin's session options) on the same tiles in the same
  order and the same batch size: every batch is scaled into a fresh contiguous float32 array, as in the
  plugin, before its timer starts (earlier versions re-ran the first batch over and over: one hot, unchanging
  buffer instead of the plugin's stream of new ones).

All are measured ``--repeats`` times, alternately, and the fastest of each is kept.

Without ``--model`` it builds a ViT-S sized model (``tests/plugin/make_tiny_bundle.py``: group-channel ViT of
width 384, 6 heads, 12 blocks, 32 px tiles of 8 px patches, 10 bands, 3-class head; random weights) with the
library's ``.venv`` and exports it with ``explora-geo export``, so fixed per-run costs do not dominate.

Each repeat times a **cold** ``classify`` (the plugin's session cache cleared, so the run creates the ONNX
Runtime session, as a user's first run does), a **warm** one (the session kept from the run before, as a
user's next run on the same model), and the bare forward. The last line is
``overhead_ratio=<cold end_to_end / forward>``; ``overhead_ratio_warm`` is printed above it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO.parent / "shared" / "data" / "sentinel2_l1c_T33UUU" / "IMG_DATA"
S2_FILE_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def make_raster(path: Path, size: int) -> Path:
    """A 13-band ``size`` x ``size`` uint16 GeoTIFF (EPSG:32633, 10 m) with band descriptions."""
    from osgeo import gdal, osr

    gdal.UseExceptions()
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 13, gdal.GDT_UInt16,
                                              ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "COMPRESS=DEFLATE",
                                               "PREDICTOR=2"])
    ds.SetGeoTransform((330000.0, 10.0, 0.0, 5822040.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    rng = np.random.default_rng(0)
    for i, name in enumerate(S2_FILE_ORDER, start=1):
        files = sorted(SCENE.glob(f"*_{name}.jp2")) if SCENE.is_dir() else []
        if files:
            src = gdal.Warp("", str(files[0]), format="MEM", xRes=10, yRes=10, resampleAlg="near")
            block = src.ReadAsArray()
            src = None
            reps = (-(-size // block.shape[0]), -(-size // block.shape[1]))
            values = np.tile(block, reps)[:size, :size]
        else:
            values = rng.integers(500, 4000, size=(size, size), dtype=np.uint16)
        band = ds.GetRasterBand(i)
        band.SetDescription(name)
        band.WriteArray(values)
    ds = None
    return path


#: benchmark model: a group-channel ViT of ViT-S size (width 384, 6 heads, 12 blocks), 32 px tiles
BENCH_SIZE = ["--embed-dim", "384", "--num-heads", "6", "--depth", "12"]


def export_bench_model(out_dir: Path) -> Path:
    """The benchmark model, built and exported by the real ``explora-geo export`` of the library environment."""
    lib_python, cli = REPO / ".venv" / "bin" / "python", REPO / ".venv" / "bin" / "explora-geo"
    builder = REPO / "tests" / "plugin" / "make_tiny_bundle.py"
    subprocess.run([str(lib_python), str(builder), str(out_dir), *BENCH_SIZE],  # noqa: S603
                   check=True, capture_output=True)
    model = out_dir / "classifier.onnx"
    command = [str(cli), "export", "--checkpoint", str(out_dir / "backbone.safetensors"), "--out", str(model),
               "--head", str(out_dir / "head.safetensors")]
    subprocess.run(command, check=True, capture_output=True)  # noqa: S603
    return model


def all_tiles(raster: Path, info: object) -> np.ndarray:
    """Every tile of the raster, in the plugin's order (row by row), as digital numbers ``[N, C, T, T]``
    (model bands by description; the benchmark raster is a whole number of tiles wide and high)."""
    from osgeo import gdal

    ds = gdal.Open(str(raster))
    names = [ds.GetRasterBand(i).GetDescription() for i in range(1, ds.RasterCount + 1)]
    t, c = info.tile_size, len(info.bands)
    rows, cols = ds.RasterYSize // t, ds.RasterXSize // t
    tiles = np.empty((rows, cols, c, t, t), dtype=np.uint16)
    for k, b in enumerate(info.bands):
        band = ds.GetRasterBand(names.index(b) + 1).ReadAsArray(0, 0, cols * t, rows * t)
        tiles[:, :, k] = band.reshape(rows, t, cols, t).transpose(0, 2, 1, 3)
    ds = None
    return tiles.reshape(-1, c, t, t)


def time_forward(model_path: Path, tiles: np.ndarray, n_tiles: int, batch: int) -> tuple[float, float]:
    """Seconds of bare ``session.run`` (wall, and process CPU) over the first ``n_tiles`` of ``tiles``, the tiles
    the plugin ran, in batches of ``batch``. Each batch is scaled into a fresh contiguous float32 array (as the
    plugin's are) before its timer starts: only ``session.run`` is timed."""
    sys.path.insert(0, str(REPO / "qgis_plugin"))
    from explora_geo_qgis.core.model import OnnxModel

    model = OnnxModel(model_path)
    scaler = model.info.scaler
    model.run(scaler(tiles[:2]))  # warm-up, as the plugin's first batch also pays it
    wall = cpu = 0.0
    for done in range(0, n_tiles, batch):
        x = scaler(tiles[done:min(done + batch, n_tiles)])
        start, start_cpu = time.perf_counter(), time.process_time()
        model.session.run(["probabilities"], {model.input_name: x})
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
    return wall, cpu


def time_classify(raster: Path, model_path: Path, out_dir: Path, batch: int) -> tuple[float, float, dict]:
    """Seconds of the whole ``explora_geo:classify`` algorithm (wall, and process CPU), and its results."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsRasterLayer

    layer = QgsRasterLayer(str(raster), "bench")
    params = {"INPUT": layer, "MODEL": str(model_path), "BATCH_SIZE": batch,
              "OUTPUT_GRID": str(out_dir / "grid.gpkg"), "OUTPUT_CLASSES": str(out_dir / "classes.tif"),
              "OUTPUT_PROBABILITY": str(out_dir / "probability.tif")}
    start, start_cpu = time.perf_counter(), time.process_time()
    result = processing.run("explora_geo:classify", params, context=QgsProcessingContext(),
                            feedback=QgsProcessingFeedback())
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    del layer
    return seconds, cpu, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 x 1024 px instead of 2048 x 2048")
    parser.add_argument("--model", type=Path, default=None, help="an exported classifier (.onnx)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate both measurements this many times and keep the fastest of each "
                             "(the machine is shared: the minimum is the least disturbed run)")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication

    app = QgsApplication([], False)
    app.setPrefixPath("/usr", True)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    sys.path.insert(0, str(REPO / "qgis_plugin"))
    from processing.core.Processing import Processing

    Processing.initialize()
    from explora_geo_qgis import classFactory

    plugin = classFactory(None)
    plugin.initProcessing()
    size = 1024 if args.quick else 2048
    with tempfile.TemporaryDirectory(prefix="explora-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        raster = make_raster(work / "scene.tif", size)
        model = args.model or export_bench_model(work)
        print(f"prepared {size} x {size} px x 13 bands and the model in {time.perf_counter() - t0:.1f} s")
        sys.path.insert(0, str(REPO / "qgis_plugin"))
        from explora_geo_qgis.core.model import OnnxModel

        tiles = all_tiles(raster, OnnxModel(model).info)
        best = {"cold": float("inf"), "warm": float("inf"), "forward": float("inf")}
        cpu = dict(best)
        inside = float("inf")
        for _ in range(max(1, args.repeats)):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    OnnxModel.clear_cache()  # the session is created inside the run, as on a first run
                seconds, cpu_s, result = time_classify(raster, model, work, args.batch_size)
                best[kind], cpu[kind] = min(best[kind], seconds), min(cpu[kind], cpu_s)
                inside = min(inside, float(result["FORWARD_SECONDS"]))
                n_tiles = int(result["TILES_RUN"])
                if n_tiles != len(tiles):
                    raise SystemExit(f"the plugin ran {n_tiles} tiles, the raster has {len(tiles)}")
            seconds, cpu_s = time_forward(model, tiles, n_tiles, args.batch_size)
            best["forward"], cpu["forward"] = min(best["forward"], seconds), min(cpu["forward"], cpu_s)
        forward = best["forward"]
        print(f"tiles={n_tiles} batch={args.batch_size} provider={result['EXECUTION_PROVIDER']} "
              f"repeats={args.repeats} raster={size}x{size} DEFLATE")
        print(f"forward_s_inside_plugin={inside:.2f} (ONNX Runtime time during the algorithm runs)")
        print(f"cpu_s: cold={cpu['cold']:.2f} warm={cpu['warm']:.2f} forward={cpu['forward']:.2f} (process CPU "
              "time, both threads; steadier than wall time on a loaded machine)")
        print(f"end_to_end_s: cold={best['cold']:.2f} warm={best['warm']:.2f} forward_s={forward:.2f} "
              f"tiles_per_s: cold={n_tiles / best['cold']:.1f} warm={n_tiles / best['warm']:.1f} "
              f"forward={n_tiles / forward:.1f}")
        print(f"overhead_ratio_warm={best['warm'] / forward:.3f} (session reused from the previous run)")
    plugin.unload()
    app.exitQgis()
    print(f"overhead_ratio={best['cold'] / forward:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

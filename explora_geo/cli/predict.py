"""``explora-geo predict``: the QGIS plugin's inference (same engine, same files) over rasters, folders or STAC."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from explora_geo.cli._stac import add_stac_arguments, stac_input_from_args

HELP = "run an exported ONNX bundle over rasters, folders or STAC items (the QGIS plugin's engine), resumable"


def register(subparsers: Any) -> None:
    """Add the ``predict`` parser."""
    p = subparsers.add_parser("predict", help=HELP, description=HELP + ". See docs/qgis.md, 'Batch inference'.")
    p.add_argument("--bundle", required=True, metavar="MODEL.onnx", help="the bundle 'explora-geo export' wrote")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="raster file(s), folder(s), glob(s) (multi-band rasters with named bands, or per-band "
                   "Sentinel-2 files), or a STAC catalog JSON")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun resumes it)")
    p.add_argument("--roi", default=None, help="vector file: only pixels inside count as valid")
    p.add_argument("--stride", type=int, default=None, metavar="PX",
                   help="distance between tiles in pixels (default: the tile size, no overlap)")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass (default 32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="ONNX Runtime device (default auto: CUDA when available)")
    p.add_argument("--min-valid", type=float, default=0.5,
                   help="skip tiles with a smaller valid-pixel fraction (default 0.5)")
    p.add_argument("--nodata", type=float, default=None, help="an extra nodata value, besides the files' own")
    p.add_argument("--scale", type=float, default=1.0, help="input transform value*SCALE+OFFSET (e.g. 10000 for "
                   "0-1 reflectance) before the model's normalisation")
    p.add_argument("--offset", type=float, default=0.0, help="see --scale")
    p.add_argument("--band-names", default=None, metavar="B1,B2,...",
                   help="names of the bands of every multi-band file, in file order (when they carry none)")
    p.add_argument("--devices", type=int, default=1, help="processes per node (e.g. one per GPU): above 1, "
                   "Lightning's predict loop (DDP) spreads the inputs' parts over them")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (torchrun/SLURM start them; see --devices)")
    p.add_argument("--part-rows", type=int, default=None, metavar="N",
                   help="tile rows per part of a large raster: parts are spread over the processes and resumed "
                   "one by one, then merged (default: about 4096 x 4096 px per part, at least 16 rows)")
    add_stac_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the inputs' catalog at the bundle's bands and GSD, run, print one JSON summary line."""
    from tqdm.auto import tqdm

    from explora_geo.data.catalog import build_catalog
    from explora_geo.errors import ExploraGeoError
    from explora_geo.predict import PredictSettings, catalog_at_gsd, open_bundle, predict
    from explora_geo.sensors import get_sensor

    if args.devices < 1 or args.num_nodes < 1:
        raise ExploraGeoError(f"--devices {args.devices} / --num-nodes {args.num_nodes} must be at least 1.")
    distributed = args.devices * args.num_nodes > 1
    # distributed: each process opens the bundle on its own device later; here only its metadata is needed
    model = open_bundle(args.bundle, "cpu" if distributed else args.device)
    info = model.info
    s2 = get_sensor("sentinel2")
    sensor = "sentinel2" if all(s2.canonical(b) for b in info.bands) else None
    bands = list(info.bands)
    band_names = [b.strip() for b in args.band_names.split(",")] if args.band_names else None

    def build(res: float | None) -> Any:
        stac = stac_input_from_args(args, bands=bands, sensor=sensor, nodata=args.nodata, res=res)
        if stac is not None:
            return stac.catalog
        if not args.data:
            raise ExploraGeoError("no input given; pass --data PATH... or --stac-search URL.")
        return build_catalog(args.data, bands=bands, sensor=sensor, band_names=band_names, nodata=args.nodata,
                             res=res)

    catalog = catalog_at_gsd(build, info.gsd_m)
    settings = PredictSettings(stride=args.stride, batch_size=args.batch_size, min_valid=args.min_valid,
                               nodata=args.nodata, scale=args.scale, offset=args.offset, device=args.device,
                               part_rows=args.part_rows)
    bar = tqdm(total=100 * len(catalog.sources), unit="%", desc="predict", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    position = {"base": 0.0, "name": None}

    def progress(name: str, percent: float) -> None:
        if name != position["name"]:
            position["base"], position["name"] = bar.n, name
            bar.set_postfix_str(name)
        bar.update(position["base"] + percent - bar.n)

    try:
        summary = predict(args.bundle, catalog, args.out, settings, roi=args.roi,
                          model=None if distributed else model, progress=progress,
                          log=lambda line: bar.write(line, file=sys.stderr), devices=args.devices,
                          num_nodes=args.num_nodes)
    finally:
        bar.close()
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0

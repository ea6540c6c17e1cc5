"""``explora-geo prepare``: cut pre-training patches once into a LitData store (a folder or an object-store URL)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from explora_geo.cli._stac import add_stac_arguments, stac_input_from_args

HELP = "cut pre-training patches into a streaming patch store (LitData) that `pretrain --data STORE` reads"


def register(subparsers: Any) -> None:
    """Add the ``prepare`` parser."""
    p = subparsers.add_parser("prepare", help=HELP, description=HELP + ". See docs/data.md, 'Prepared stores'.")
    p.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="folder(s), glob(s) or raster file(s): multi-band mosaics or per-band Sentinel-2 files; "
                   "or a STAC catalog JSON (see 'STAC input'); required unless --stac-search is given")
    p.add_argument("--bands", required=True, metavar="SENSOR|B1,B2,...",
                   help="a sensor preset (all its bands, e.g. sentinel2) or comma-separated band names")
    p.add_argument("--out", required=True, metavar="DIR|URL",
                   help="the store: a folder, or an object-store URL (s3://, gs://, r2://)")
    p.add_argument("--patches", required=True, type=int, help="patches to draw (random) or at most (grid)")
    p.add_argument("--patch-size", required=True, type=int, metavar="PX", help="patch side in pixels")
    p.add_argument("--sampler", choices=["random", "grid"], default="random",
                   help="torchgeo RandomPatchSampler (default) or GriddedPatchSampler")
    p.add_argument("--roi", default=None, help="vector file restricting where patches are cut (any CRS)")
    p.add_argument("--max-nodata-fraction", type=float, default=0.5,
                   help="reject patches with more missing pixels than this (default 0.5)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPU count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch positions (default 0)")
    p.add_argument("--sensor", default=None, help="preset naming the files' bands when --bands lists names "
                   "(default: sentinel2)")
    p.add_argument("--band-names", default=None, metavar="B1,B2,...",
                   help="names of the bands of every multi-band file, in file order")
    p.add_argument("--nodata", type=float, default=None, help="nodata value (default: file metadata, else 0)")
    p.add_argument("--res", type=float, default=None, help="target GSD in metres (default: finest native)")
    p.add_argument("--dn-offset", default="auto", help="'auto' (detect Sentinel-2 L2A +1000) or DN to subtract")
    p.add_argument("--compression", choices=["none", "zstd"], default="none",
                   help="LitData chunk compression (default none; zstd: smaller store, see docs/data.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    add_stac_arguments(p)  # STAC input: explora_geo/cli/_stac.py
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the store; print the summary lines and one JSON line (the summary)."""
    from explora_geo.cli._data_args import data_args
    from explora_geo.data.prepare import catalog_skipping_unreadable, check_store_target, prepare_store
    from explora_geo.errors import ExploraGeoError

    chosen = data_args(args)
    sensor, bands, offset, band_names = chosen.sensor, chosen.bands, chosen.dn_offset, chosen.band_names
    if args.patches < 1:
        raise ExploraGeoError(f"--patches {args.patches}: a store needs at least 1 patch; pass e.g. --patches 10000.")
    check_store_target(args.out, args.overwrite)  # before scanning the data
    provenance: dict[str, Any] = {"command": "explora-geo prepare", "data": [str(d) for d in args.data or []]}
    # STAC input (a catalog among --data, or --stac-search): explora_geo/cli/_stac.py
    stac = stac_input_from_args(args, bands=bands, sensor=sensor, nodata=args.nodata, res=args.res,
                                dn_offset=offset)
    if stac is not None:
        catalog, skipped = stac.catalog, []
        provenance.update(stac.provenance)
    elif not args.data:
        raise ExploraGeoError("no input given; pass --data PATH... or --stac-search URL.")
    else:
        data = args.data[0] if len(args.data) == 1 else args.data
        catalog, skipped = catalog_skipping_unreadable(
            data, bands=bands, sensor=sensor, band_names=band_names, nodata=args.nodata, res=args.res,
            dn_offset=offset)
    print(catalog.describe(), file=sys.stderr)
    summary = prepare_store(
        catalog, args.out, patches=args.patches, patch_size=args.patch_size, sampler=args.sampler, roi=args.roi,
        max_nodata_fraction=args.max_nodata_fraction, workers=args.workers, seed=args.seed,
        overwrite=args.overwrite, skipped_files=skipped, provenance=provenance,
        compression=None if args.compression == "none" else args.compression,
    )
    if "node" in summary:  # one of several nodes; the last one writes the store's summary
        print(f"node {summary['node']} of {summary['nodes']}: {summary['node_patches_written']} patches written "
              f"of the store's {summary['patches_requested']}; the store is complete", file=sys.stderr)
        print(json.dumps(summary))
        return 0
    print(f"patches: {summary['patches_requested']} requested, {summary['patches_written']} written, "
          f"{summary['patches_rejected']} rejected (nodata > {args.max_nodata_fraction:g}), "
          f"{summary['patches_unreadable']} unreadable; {summary['patches_per_s']:.1f} patches/s", file=sys.stderr)
    for item in summary["files_skipped"]:
        print(f"skipped {item['path']}: {item['error']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0

"""``explora-geo stats``: per-band mean, std and percentiles of a mosaic, estimated from random patches."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "per-band mean/std/percentiles of rasters (from random patches), as JSON loadable as a normalisation"


def register(subparsers: Any) -> None:
    """Add the ``stats`` parser."""
    p = subparsers.add_parser("stats", help=HELP, description=HELP)
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="folder(s), glob(s) or raster file(s): multi-band mosaics or per-band Sentinel-2 files")
    p.add_argument("--bands", required=True, metavar="SENSOR|B1,B2,...",
                   help="a sensor preset (all its bands, e.g. sentinel2, sentinel2_l2a) "
                   "or comma-separated band names")
    p.add_argument("--sensor", default=None, help="preset naming the files' bands when --bands lists names "
                   "(default: sentinel2)")
    p.add_argument("--band-names", default=None, metavar="B1,B2,...",
                   help="names of the bands of every multi-band file, in file order "
                   "(e.g. EuroSAT's B8A-last order)")
    p.add_argument("--out", default=None, help="write the statistics JSON here")
    p.add_argument("--patches", type=int, default=256, help="number of random patches (default 256)")
    p.add_argument("--patch-size", type=int, default=64, help="patch side in pixels (default 64)")
    p.add_argument("--nodata", type=float, default=None, help="nodata value (default: file metadata, else 0)")
    p.add_argument("--max-nodata-fraction", type=float, default=0.5, help="redraw patches with more nodata")
    p.add_argument("--roi", default=None, help="vector file restricting where patches are drawn")
    p.add_argument("--res", type=float, default=None, help="resolution in CRS units (default: finest native)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dn-offset", default="auto", help="'auto' (detect Sentinel-2 L2A +1000) or DN to subtract")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute, print and optionally save the statistics."""
    from explora_geo.cli._data_args import data_args
    from explora_geo.data.stats import compute_stats, save_stats

    chosen = data_args(args)
    sensor, bands, offset, band_names = chosen.sensor, chosen.bands, chosen.dn_offset, chosen.band_names
    stats = compute_stats(
        args.data, bands=bands, sensor=sensor, band_names=band_names, nodata=args.nodata,
        patch_size=args.patch_size, num_patches=args.patches, seed=args.seed, roi=args.roi,
        max_nodata_fraction=args.max_nodata_fraction, dn_offset=offset, res=args.res,
    )
    print(f"{stats['pixels']} valid pixels from {stats['patches']} patches of {stats['patch_size']} px "
          f"({stats['rejected']} rejected for nodata); dn offset {stats['dn_offset']:g}")
    print(f"{'band':>6} {'mean':>10} {'std':>10} {'p2':>10} {'p50':>10} {'p98':>10}")
    for k, band in enumerate(stats["bands"]):
        pct = stats["percentiles"]
        print(f"{band:>6} {stats['mean'][k]:10.2f} {stats['std'][k]:10.2f} {pct['p2'][k]:10.1f} "
              f"{pct['p50'][k]:10.1f} {pct['p98'][k]:10.1f}")
    if args.out:
        print(f"wrote {save_stats(stats, args.out)}")
    return 0

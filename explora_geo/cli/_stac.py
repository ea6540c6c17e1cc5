"""STAC flags shared by commands that read rasters (``prepare``): a STAC document among ``--data``, or a search.

``add_stac_arguments(parser)`` adds ``--stac-search URL --collection NAME --bbox W,S,E,N --datetime START/END
--max-cloud N --max-items N``; ``stac_input_from_args(args, ...)`` turns them (or STAC JSON files/URLs given to
``--data``) into a :class:`~explora_geo.data.stac.StacInput`, or returns ``None`` when the input is plain
raster files. Not a sub-command (the leading underscore keeps it out of discovery).
"""

from __future__ import annotations

import argparse
from typing import Any

from explora_geo.errors import ExploraGeoError

_SEARCH_ONLY = ("collection", "bbox", "datetime", "max_items")


def add_stac_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the STAC input flags (``--data`` itself stays the command's own)."""
    group = parser.add_argument_group(
        "STAC input", "a STAC Catalog/Collection/ItemCollection/Item JSON (path or URL) given to --data is read "
        "as a catalog; or search a STAC API instead of --data")
    group.add_argument("--stac-search", metavar="URL", default=None,
                       help="STAC API to search, e.g. https://earth-search.aws.element84.com/v1")
    group.add_argument("--collection", metavar="NAME", default=None,
                       help="collection(s) to search, comma-separated, e.g. sentinel-2-l2a")
    group.add_argument("--bbox", metavar="W,S,E,N", default=None, help="search box in degrees (EPSG:4326)")
    group.add_argument("--datetime", metavar="START/END", default=None,
                       help="search date or interval, e.g. 2023-06-01/2023-08-31")
    group.add_argument("--max-cloud", type=float, metavar="N", default=None,
                       help="skip STAC items whose eo:cloud_cover is above N percent (searched and static)")
    group.add_argument("--max-items", type=int, metavar="N", default=None, help="stop the search after N items")


def parse_bbox(text: str) -> list[float]:
    """``"W,S,E,N"`` in degrees as four floats (one-line error otherwise)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ExploraGeoError(f"--bbox {text!r} is not four numbers W,S,E,N; pass e.g. --bbox 12.1,52.3,12.6,52.6.")
    west, south, east, north = values
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south < north <= 90):
        raise ExploraGeoError(f"--bbox {text!r} is not W,S,E,N in degrees (south below north, within +-180/+-90); "
                              "pass longitudes and latitudes in EPSG:4326.")
    return values


def stac_input_from_args(args: argparse.Namespace, *, bands: list[str], sensor: Any, nodata: float | None = None,
                         res: float | None = None, crs: Any = None, dn_offset: float | str = "auto") -> Any:
    """The STAC input of a command line, or ``None`` when ``--data`` names plain rasters.

    Returns:
        a :class:`~explora_geo.data.stac.StacInput` (``.catalog``, ``.provenance``), or ``None``.

    Raises:
        ExploraGeoError: ``--stac-search`` together with ``--data``, STAC documents mixed with rasters in
            ``--data``, search flags without ``--stac-search``, and every error of the STAC input itself.
    """
    from explora_geo.data.stac import catalog_from_items, is_stac_path, read_static_items, search_items

    data = [str(d) for d in (getattr(args, "data", None) or [])]
    documents = [d for d in data if is_stac_path(d)]
    given = [f"--{name.replace('_', '-')}" for name in _SEARCH_ONLY if getattr(args, name, None) is not None]
    if args.stac_search:
        if data:
            raise ExploraGeoError("pass either --data or --stac-search, not both; prepare each input separately.")
        collections = [c.strip() for c in args.collection.split(",") if c.strip()] if args.collection else None
        if args.max_items is not None and args.max_items < 1:
            raise ExploraGeoError(f"--max-items {args.max_items} is not positive; pass at least 1.")
        bbox = parse_bbox(args.bbox) if args.bbox else None
        items = search_items(args.stac_search, collections=collections, bbox=bbox, datetime=args.datetime,
                             max_cloud=args.max_cloud, max_items=args.max_items)
        provenance = {"search": {"url": args.stac_search, "collections": collections, "bbox": bbox,
                                 "datetime": args.datetime, "max_cloud": args.max_cloud,
                                 "max_items": args.max_items}}
    elif given:
        raise ExploraGeoError(f"{', '.join(given)} only apply to a STAC search; add --stac-search URL.")
    elif documents:
        if len(documents) != len(data):
            raster = next(d for d in data if d not in documents)
            raise ExploraGeoError(f"--data mixes STAC documents ({documents[0]}) and rasters ({raster}); prepare "
                                  "them separately, or list the rasters in a STAC catalog.")
        items = [item for doc in documents for item in read_static_items(doc)]
        provenance = {"catalog": documents[0] if len(documents) == 1 else documents}
    elif args.max_cloud is not None:
        raise ExploraGeoError("--max-cloud only applies to STAC input (it filters items by eo:cloud_cover); "
                              "drop it or pass a STAC catalog / --stac-search.")
    else:
        return None
    return catalog_from_items(items, bands=bands, sensor=sensor, nodata=nodata, res=res, crs=crs,
                              dn_offset=dn_offset, max_cloud=args.max_cloud, provenance=provenance)

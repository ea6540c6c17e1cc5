"""STAC input: turn a static catalog or a STAC API search into a :class:`~explora_geo.data.catalog.Catalog`.

Each STAC item becomes one :class:`~explora_geo.data.catalog.Source` with one channel per requested band,
exactly like a scene of per-band files: its grid is the grid of its finest requested asset, and coarser
assets (20/60 m Sentinel-2 bands) are resampled onto it when patches are read.

- **Items** come from a static Catalog / Collection (child links walked), an ItemCollection, a single Item
  (:func:`read_static_items`), or a search through pystac-client (:func:`search_items`).
- **Bands** are matched by name (:func:`match_band_assets`): the asset key (``B02``, ``B8A``, ``blue``,
  ``nir08``), else the asset's ``eo:bands`` / ``bands`` name, else its common name when exactly one asset of
  the item carries it. Names go through the sensor preset's aliases.
- **Hrefs** become GDAL paths (:func:`gdal_path`): local paths as they are, ``http(s)://`` through
  ``/vsicurl/``, ``s3://`` through ``/vsis3/``, ``gs://`` through ``/vsigs/``. Every requested asset's header
  is opened once (in threads) to learn its grid; an unreadable href is an error naming it.
- **Cloud cover**: items whose ``eo:cloud_cover`` exceeds ``max_cloud`` are skipped and counted.
- **DN offset**: Sentinel-2 processing baseline >= 04.00 (``s2:processing_baseline``) means +1000 DN; items
  of both kinds in one input are an error (the catalog has one offset).

:func:`catalog_from_items` returns a :class:`StacInput`: the catalog plus a ``provenance`` dict (catalog
path or search, item ids, skipped items) for the prepared store's metadata.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explora_geo.data.catalog import (
    Catalog,
    RasterInfo,
    dn_offset_from,
    grid_units,
    inspect_raster,
    requested_bands,
)
from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import Sensor, canonical_band_name, get_sensor

__all__ = [
    "StacInput",
    "catalog_from_items",
    "gdal_path",
    "is_stac_path",
    "match_band_assets",
    "read_static_items",
    "search_items",
]

_STAC_TYPES = ("Catalog", "Collection", "FeatureCollection", "Feature")
# Extensions of raster assets (a media type, when given, decides instead).
_RASTER_HREF = (".tif", ".tiff", ".jp2", ".vrt", ".img")


@dataclass
class StacInput:
    """A STAC input resolved to a catalog.

    Attributes:
        catalog: sources (one per kept item), grid, bands, nodata, offset.
        items: ids of the items used, in source order.
        skipped_cloudy: ids of the items skipped for ``eo:cloud_cover`` above the limit.
        provenance: JSON-ready record of the input (``catalog`` or ``search``, ``items``, ``skipped_cloudy``,
            ``max_cloud``) for the store's metadata.
    """

    catalog: Catalog
    items: list[str]
    skipped_cloudy: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Reading items
# ----------------------------------------------------------------------------------------------------------

def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def is_stac_path(value: str | os.PathLike[str]) -> bool:
    """Whether a ``--data`` value names a STAC document: a ``.json`` file or an ``http(s)`` URL of one.

    Only the name decides; :func:`read_static_items` then checks the content (a ``.json`` that is not STAC is
    an error there, not silently a raster).
    """
    text = os.fspath(value)
    name = text.split("?", 1)[0].lower()
    return name.endswith((".json", ".geojson")) and (_is_url(text) or os.path.isfile(text))


def _load_json(location: str) -> dict[str, Any]:
    """The JSON object at a local path or URL (one-line errors)."""
    if _is_url(location):
        import urllib.request

        try:
            with urllib.request.urlopen(location, timeout=30) as response:
                text = response.read().decode("utf-8")
        except Exception as err:  # URLError, HTTPError, timeouts
            raise ExploraGeoError(f"cannot read the STAC document {location} ({err}); check the URL and the "
                                  "network.") from err
    else:
        try:
            text = Path(location).read_text(encoding="utf-8")
        except OSError as err:
            raise ExploraGeoError(f"cannot read {location} ({err.strerror}); check --data.") from err
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ExploraGeoError(f"{location} is not JSON ({err}); pass a STAC catalog, collection, item "
                              "collection or item.") from err
    kind = doc.get("type") if isinstance(doc, dict) else None
    stac = isinstance(doc, dict) and ("stac_version" in doc or (
        kind == "FeatureCollection" and all(isinstance(f, dict) and "stac_version" in f
                                            for f in doc.get("features") or [None])))
    if kind not in _STAC_TYPES or not stac:
        raise ExploraGeoError(
            f"{location} is not a STAC document (type {kind!r}, "
            f"{'with' if isinstance(doc, dict) and 'stac_version' in doc else 'no'} stac_version); pass a STAC "
            "Catalog, Collection, ItemCollection or Item JSON, or raster files."
        )
    return doc


def read_static_items(location: str | os.PathLike[str]) -> list[Any]:
    """The items of a static STAC document: a Catalog or Collection (child links walked recursively), an
    ItemCollection or one Item, from a local path or an ``http(s)`` URL.

    Returns:
        ``pystac.Item`` objects whose asset hrefs resolve to absolute hrefs.

    Raises:
        ExploraGeoError: the document is not STAC, a link cannot be followed, or it holds no item.
    """
    import pystac

    text = os.fspath(location)
    where = text if _is_url(text) else os.path.abspath(text)
    doc = _load_json(where)
    try:
        if doc["type"] == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(doc, preserve_dict=False).items)
            for item in items:  # relative asset hrefs are relative to the item collection's file
                for asset in item.assets.values():
                    asset.href = _absolute(asset.href, where)
        elif doc["type"] == "Feature":
            items = [pystac.Item.from_dict(doc, href=where)]
            items[0].set_self_href(where)
        else:
            root = pystac.read_dict(doc, href=where)
            root.set_self_href(where)
            items = list(root.get_items(recursive=True))
    except ExploraGeoError:
        raise
    except FileNotFoundError as err:
        raise ExploraGeoError(f"{where} links to {err.filename}, which does not exist; fix the catalog's "
                              "links.") from err
    except Exception as err:  # pystac's STACTypeError, KeyError on malformed documents, network errors
        raise ExploraGeoError(f"cannot read the STAC catalog {where} ({type(err).__name__}: {err}); check that "
                              "it and every document it links to is valid STAC.") from err
    if not items:
        raise ExploraGeoError(f"the STAC catalog {where} holds no item; point --data at a catalog with items.")
    return items


def _absolute(href: str, base: str) -> str:
    if "://" in href or href.startswith("/"):
        return href
    if _is_url(base):
        from urllib.parse import urljoin

        return urljoin(base, href)
    return os.path.normpath(os.path.join(os.path.dirname(base), href))


def search_items(
    url: str,
    *,
    collections: Sequence[str] | None = None,
    bbox: Sequence[float] | None = None,
    datetime: str | None = None,
    max_cloud: float | None = None,
    max_items: int | None = None,
    timeout: float = 60.0,
) -> list[Any]:
    """Items found by a STAC API search (pystac-client).

    Args:
        url: the API's landing page, e.g. ``https://earth-search.aws.element84.com/v1``.
        collections: collection ids to search.
        bbox: ``(west, south, east, north)`` in degrees (EPSG:4326).
        datetime: an RFC 3339 instant or interval, ``"2023-06-01/2023-08-31"``.
        max_cloud: when the API supports the query extension, only items with ``eo:cloud_cover <= max_cloud``
            are asked for (the caller filters again, so APIs without it work too).
        max_items: stop after this many items.
        timeout: seconds per HTTP request.

    Raises:
        ExploraGeoError: the API cannot be reached or rejects the search (one line naming the URL), or the
            search returns nothing (naming what was searched).
    """
    from pystac_client import Client

    what = describe_search(url, collections=collections, bbox=bbox, datetime=datetime, max_cloud=max_cloud)
    try:
        client = Client.open(url, timeout=timeout)
        query = None
        if max_cloud is not None and client.conforms_to("QUERY"):
            query = {"eo:cloud_cover": {"lte": max_cloud}}
        search = client.search(collections=list(collections) if collections else None,
                               bbox=list(bbox) if bbox else None, datetime=datetime, query=query,
                               max_items=max_items)
        items = list(search.items())
    except Exception as err:  # requests' ConnectionError, pystac_client's APIError, bad parameters
        reason = " ".join(str(err).split())
        errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", reason)  # "[Errno 111] Connection refused"
        reason = errno.group(0) if errno else reason if len(reason) <= 200 else reason[:200] + "..."
        raise ExploraGeoError(f"the STAC search {what} failed ({type(err).__name__}: {reason}); check the URL, "
                              "the parameters and the network, or use a static catalog (--data catalog.json)."
                              ) from err
    if not items:
        raise ExploraGeoError(f"the STAC search {what} returned no item; widen the bbox, the datetime or "
                              "--max-cloud, or check the collection name.")
    return items


def describe_search(url: str, *, collections: Sequence[str] | None = None, bbox: Sequence[float] | None = None,
                    datetime: str | None = None, max_cloud: float | None = None) -> str:
    """One phrase naming a search, for messages: ``of URL (collection X, bbox ..., datetime ...)``."""
    parts = [f"collection {','.join(collections)}" if collections else "all collections"]
    if bbox:
        parts.append("bbox " + ",".join(f"{v:g}" for v in bbox))
    if datetime:
        parts.append(f"datetime {datetime}")
    if max_cloud is not None:
        parts.append(f"eo:cloud_cover <= {max_cloud:g}")
    return f"of {url} ({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------------------
# Assets
# ----------------------------------------------------------------------------------------------------------

def gdal_path(href: str) -> str:
    """A GDAL-readable path for an asset href: ``https://h/x.tif`` -> ``/vsicurl/https://h/x.tif``,
    ``s3://bucket/key`` -> ``/vsis3/bucket/key``, ``gs://`` -> ``/vsigs/``, ``file:///p`` -> ``/p``; local
    paths and ``/vsi...`` paths are returned unchanged."""
    if href.startswith("/vsi"):
        return href
    if _is_url(href):
        return f"/vsicurl/{href}"
    for scheme, prefix in (("s3://", "/vsis3/"), ("gs://", "/vsigs/"), ("az://", "/vsiaz/")):
        if href.startswith(scheme):
            return prefix + href[len(scheme):]
    if href.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(href).path)
    return href


def _asset_bands(asset: Any) -> list[dict[str, Any]]:
    """The per-band records of an asset: STAC 1.0 ``eo:bands`` or STAC 1.1 ``bands``."""
    fields = asset.extra_fields
    bands = fields.get("eo:bands") or fields.get("bands") or []
    return [b for b in bands if isinstance(b, dict)]


# Rendered products (8-bit true colour, previews): never a source of a band's values.
_RENDERED_ROLES = {"visual", "overview", "thumbnail"}
_RENDERED_KEYS = {"visual", "tci", "rendered_preview", "preview"}


def _is_raster(asset: Any, key: str = "") -> bool:
    if key.lower() in _RENDERED_KEYS or _RENDERED_ROLES & set(asset.roles or ()):
        return False
    media = (asset.media_type or "").lower()
    if media:
        return "tiff" in media or "jp2" in media or "jpeg2000" in media or "vrt" in media
    return asset.href.split("?", 1)[0].lower().endswith(_RASTER_HREF)


def _label(name: str, sensor: Sensor | None) -> str:
    """A band label folded for comparison: the sensor's canonical name when it knows it, else canonical."""
    if sensor is not None:
        known = sensor.canonical(name)
        if known is not None:
            return known
    return canonical_band_name(name).upper()


def match_band_assets(item: Any, bands: Sequence[str], sensor: Sensor | None) -> list[tuple[str, int]]:
    """For each requested band, the item's ``(asset key, 1-based band index in that asset)``.

    A band is found, in this order of precedence, by the asset key (``B02``, ``blue``), by the name of one of
    the asset's ``eo:bands`` (``bands`` in STAC 1.1), or by its ``common_name`` when exactly one raster asset
    of the item carries that common name (``rededge`` shared by three assets matches none). Names go through
    the sensor's aliases (``nir08`` is ``B8A`` for Sentinel-2). Only raster assets (GeoTIFF, JPEG2000, VRT)
    are considered, and never rendered ones (the 8-bit ``visual``/TCI true colour, previews, thumbnails);
    when several assets name the same band, a cloud-optimised GeoTIFF is preferred.

    Raises:
        ExploraGeoError: naming the item and the first band it has no asset for.
    """
    assets = {k: a for k, a in item.assets.items() if _is_raster(a, k)}
    by_key: dict[str, list[tuple[str, int]]] = {}
    by_name: dict[str, list[tuple[str, int]]] = {}
    by_common: dict[str, list[tuple[str, int]]] = {}
    for key, asset in assets.items():
        records = _asset_bands(asset)
        if len(records) <= 1:
            by_key.setdefault(_label(key, sensor), []).append((key, 1))
        for index, record in enumerate(records, start=1):
            if record.get("name"):
                by_name.setdefault(_label(str(record["name"]), sensor), []).append((key, index))
            common = record.get("common_name") or record.get("eo:common_name")
            if common:
                by_common.setdefault(str(common).strip().lower(), []).append((key, index))
    common_unique = {_label(c, sensor): hits[0] for c, hits in by_common.items()
                     if len({k for k, _ in hits}) == 1}

    def best(hits: list[tuple[str, int]]) -> tuple[str, int]:
        def rank(hit: tuple[str, int]) -> tuple[int, str]:
            media = (assets[hit[0]].media_type or "").lower()
            return (0 if "cloud-optimized" in media else 1 if "tiff" in media else 2, hit[0])

        return min(hits, key=rank)

    chosen = []
    for band in bands:
        want = _label(band, sensor)
        if want in by_key:
            chosen.append(best(by_key[want]))
        elif want in by_name:
            chosen.append(best(by_name[want]))
        elif want in common_unique:
            chosen.append(common_unique[want])
        else:
            raise ExploraGeoError(
                f"STAC item {item.id} has no asset for band {band} (raster assets: "
                f"{', '.join(sorted(assets)) or 'none'}); choose --bands it has, or other items."
            )
    return chosen


def _item_offset(item: Any, infos: Sequence[RasterInfo]) -> tuple[float, str]:
    """The DN offset of one item: Sentinel-2 processing baseline >= 04.00 means 1000, else header tags."""
    baseline = item.properties.get("s2:processing_baseline")
    if baseline is not None:
        try:
            value = float(str(baseline))
        except ValueError:
            value = None
        if value is not None:
            return (1000.0 if value >= 4.0 else 0.0), f"s2:processing_baseline {baseline}"
    return dn_offset_from([], [i.tags for i in infos])


def _read_headers(paths: Sequence[str], where: Sequence[str]) -> dict[str, RasterInfo]:
    """Headers of distinct GDAL paths, read in threads (remote opens are latency-bound), with a progress bar."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(paths))
    names = dict(zip(paths, where, strict=True))

    def one(path: str) -> RasterInfo:
        try:
            return inspect_raster(path)
        except ExploraGeoError as err:
            raise ExploraGeoError(f"cannot read {names[path]}: {err}") from err

    workers = min(16, max(1, len(unique)))
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(one, unique), total=len(unique), desc="STAC asset headers", unit="asset",
                            disable=len(unique) < 50))
    return dict(zip(unique, results, strict=True))


def _set_remote_gdal_defaults(paths: Iterable[str]) -> None:
    """Sensible GDAL settings for cloud-hosted COGs, unless the user set them (inherited by workers)."""
    if any(p.startswith("/vsi") for p in paths):
        os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
        os.environ.setdefault("GDAL_HTTP_MAX_RETRY", "4")
        os.environ.setdefault("GDAL_HTTP_RETRY_DELAY", "1")


# ----------------------------------------------------------------------------------------------------------
# Catalog
# ----------------------------------------------------------------------------------------------------------

def catalog_from_items(
    items: Sequence[Any],
    *,
    bands: Sequence[str],
    sensor: str | Sensor | None = "sentinel2",
    nodata: float | None = None,
    res: float | tuple[float, float] | None = None,
    crs: Any = None,
    dn_offset: float | str = "auto",
    max_cloud: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> StacInput:
    """A :class:`Catalog` with one source per STAC item (items over ``max_cloud`` skipped).

    Args:
        items: ``pystac.Item`` objects (see :func:`read_static_items`, :func:`search_items`).
        bands, sensor, nodata, res, crs, dn_offset: as in :func:`~explora_geo.data.catalog.build_catalog`;
            ``dn_offset="auto"`` takes each item's ``s2:processing_baseline``.
        max_cloud: skip items whose ``eo:cloud_cover`` (percent) is above it; items without the property
            are kept (and counted in the notes).
        provenance: what the items came from (``{"catalog": path}`` or ``{"search": {...}}``), completed with
            the item ids.

    Raises:
        ExploraGeoError: an item lacking a requested band, an unreadable href (named), assets of one item in
            different CRSs, every item over the cloud limit, items with different DN offsets.
    """
    preset = get_sensor(sensor) if sensor is not None else None
    wanted = requested_bands(bands, preset)
    if max_cloud is not None and not 0 <= max_cloud <= 100:
        raise ExploraGeoError(f"--max-cloud {max_cloud:g} is not a percentage; pass a value from 0 to 100.")
    kept, cloudy, unknown = [], [], 0
    for item in items:
        cover = item.properties.get("eo:cloud_cover")
        if max_cloud is not None and cover is None:
            unknown += 1
        if max_cloud is not None and cover is not None and float(cover) > max_cloud:
            cloudy.append(item.id)
        else:
            kept.append(item)
    if not kept:
        raise ExploraGeoError(f"all {len(items)} STAC item(s) have eo:cloud_cover above --max-cloud "
                              f"{max_cloud:g}; raise --max-cloud or search other dates.")
    ids = [item.id for item in kept]
    if len(set(ids)) != len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise ExploraGeoError(f"STAC item {twice} appears more than once in the input; pass each item once.")

    matched = [match_band_assets(item, wanted, preset) for item in kept]
    hrefs = [[item.assets[key].get_absolute_href() or item.assets[key].href for key, _ in m]
             for item, m in zip(kept, matched, strict=True)]
    paths = [[gdal_path(h) for h in row] for row in hrefs]
    flat = [p for row in paths for p in row]
    where = [f"STAC item {item.id} asset {key} ({href})"
             for item, m, row in zip(kept, matched, hrefs, strict=True) for (key, _), href in zip(m, row, strict=True)]
    _set_remote_gdal_defaults(flat)
    headers = _read_headers(flat, where)

    units: list[tuple[str, tuple[tuple[str, int], ...], RasterInfo]] = []
    offsets: list[tuple[float, str, str]] = []
    for item, m, row in zip(kept, matched, paths, strict=True):
        infos = [headers[p] for p in row]
        for (key, index), info in zip(m, infos, strict=True):
            if index > info.count:
                raise ExploraGeoError(f"STAC item {item.id} asset {key} declares band {index} but its raster has "
                                      f"{info.count}; fix the item's eo:bands.")
        ref = min(infos, key=lambda i: i.res[0] * i.res[1])
        for (key, _), info in zip(m, infos, strict=True):
            if info.crs != ref.crs:
                raise ExploraGeoError(f"STAC item {item.id} asset {key} is in {info.crs} but the item's finest band "
                                      f"is in {ref.crs}; use items whose assets share a CRS.")
        units.append((item.id, tuple((p, index) for p, (_, index) in zip(row, m, strict=True)), ref))
        offsets.append((*_item_offset(item, infos), item.id))

    notes: list[str] = [f"STAC: {len(kept)} item(s)"]
    if max_cloud is not None:
        notes.append(f"STAC: skipped {len(cloudy)} item(s) with eo:cloud_cover above {max_cloud:g}"
                     + (f"; {unknown} item(s) have no eo:cloud_cover and were kept" if unknown else ""))
    placed = grid_units(units, crs_from=[ref for _, _, ref in units], nodata_from=list(headers.values()), crs=crs,
                        res=res, nodata=nodata, notes=notes, noun="items")
    if isinstance(dn_offset, str):
        if dn_offset != "auto":
            raise ExploraGeoError(f"dn_offset {dn_offset!r} is not 'auto' or a number; pass e.g. 1000 or 'auto'.")
        distinct = {o for o, _, _ in offsets}
        if len(distinct) > 1:
            a = next(x for x in offsets if x[0] == min(distinct))
            b = next(x for x in offsets if x[0] == max(distinct))
            raise ExploraGeoError(
                f"STAC items need different DN offsets: {a[2]} {a[0]:g} ({a[1]}) and {b[2]} {b[0]:g} ({b[1]}); "
                "prepare them separately (e.g. split --datetime at 2022-01-25, Sentinel-2 baseline 04.00)."
            )
        offset, offset_origin = offsets[0][0], offsets[0][1] + (" (every item)" if len(offsets) > 1 else "")
    else:
        offset, offset_origin = float(dn_offset), "user"
    file_bands = tuple(sorted({_label(k, preset) for item in kept for k, a in item.assets.items()
                               if _is_raster(a, k) and (preset is None or preset.canonical(k))}))
    catalog = Catalog("band_files", wanted, file_bands, placed.sources, placed.crs, placed.res, placed.nodata,
                      placed.nodata_origin, offset, offset_origin, preset, notes, gsd=placed.gsd)
    record = dict(provenance or {})
    record.update(items=ids, skipped_cloudy=cloudy, max_cloud=max_cloud)
    return StacInput(catalog, ids, cloudy, {"stac": record})

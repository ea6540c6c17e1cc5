"""STAC input: static catalogs and searches of the real T33UUU scene, as COGs, in both asset-key conventions."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pystac = pytest.importorskip("pystac")
rasterio = pytest.importorskip("rasterio")

from explora_geo.data.catalog import build_catalog
from explora_geo.data.fast import HandlePool, read_window
from explora_geo.data.stac import (
    catalog_from_items,
    gdal_path,
    is_stac_path,
    match_band_assets,
    read_static_items,
    search_items,
)
from explora_geo.errors import ExploraGeoError

BANDS = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12", "B01", "B09"]
# Earth Search style asset keys (and STAC common names) of the Sentinel-2 bands.
EARTH_SEARCH = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
                "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09",
                "B10": "cirrus", "B11": "swir16", "B12": "swir22"}
COMMON = {"B05": "rededge", "B06": "rededge", "B07": "rededge"}  # shared common names are not unique


@pytest.fixture(autouse=True)
def _restore_gdal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading remote hrefs sets GDAL variables in ``os.environ`` for the whole process (and its workers);
    ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` also hides local ``.aux.xml`` files from later reads, so every
    test here gets them put back as they were (monkeypatch restores what it touched)."""
    for key in ("GDAL_DISABLE_READDIR_ON_OPEN", "GDAL_HTTP_MAX_RETRY", "GDAL_HTTP_RETRY_DELAY"):
        monkeypatch.setenv(key, os.environ.get(key, "unset"))  # records the value (or its absence) to restore
        if os.environ[key] == "unset":
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def cogs(tmp_path_factory: pytest.TempPathFactory, t33uuu_dir: Path) -> dict[str, Path]:
    """The 13 T33UUU JP2 bands rewritten as DEFLATE COGs (lossless: same pixels, same grids)."""
    out = tmp_path_factory.mktemp("cogs")
    files = {}
    for jp2 in sorted(t33uuu_dir.glob("*.jp2")):
        band = jp2.stem.rsplit("_", 1)[1]
        with rasterio.open(jp2) as src:
            profile = {"driver": "COG", "dtype": src.dtypes[0], "count": 1, "width": src.width,
                       "height": src.height, "crs": src.crs, "transform": src.transform, "compress": "deflate",
                       "blocksize": 256}
            data = src.read()
        files[band] = out / f"{band}.tif"
        with rasterio.open(files[band], "w", **profile) as dst:
            dst.write(data)
    return files


def make_item(item_id: str, cogs: dict[str, Path], convention: str, *, cloud: float | None = None,
              baseline: str | None = None, drop: tuple[str, ...] = ()) -> pystac.Item:
    """An item of the T33UUU scene whose assets are the COGs, keyed ``B02`` (``"key"``) or ``blue``
    (``"earth_search"``); ``eo:bands`` carry the name and common name as real catalogs do."""
    from rasterio.warp import transform_bounds

    with rasterio.open(cogs["B02"]) as src:
        bbox = list(transform_bounds(src.crs, "EPSG:4326", *src.bounds))
        epsg = src.crs.to_epsg()
    west, south, east, north = bbox
    geometry = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                    [west, south]]]}
    props = {"proj:epsg": epsg}
    if cloud is not None:
        props["eo:cloud_cover"] = cloud
    if baseline is not None:
        props["s2:processing_baseline"] = baseline
    import datetime as dt

    item = pystac.Item(item_id, geometry, bbox, dt.datetime(2017, 2, 16, 10, 21, tzinfo=dt.UTC), props)
    for band, path in cogs.items():
        if band in drop:
            continue
        key = band if convention == "key" else EARTH_SEARCH[band]
        name = band if convention == "key" else EARTH_SEARCH[band]
        common = COMMON.get(band, EARTH_SEARCH[band])
        item.add_asset(key, pystac.Asset(str(path), media_type=pystac.MediaType.COG, roles=["data"],
                                         extra_fields={"eo:bands": [{"name": name, "common_name": common}]}))
    item.add_asset("thumbnail", pystac.Asset(str(cogs["B02"].with_suffix(".png")), media_type="image/png",
                                             roles=["thumbnail"]))
    return item


def save_catalog(folder: Path, items: list[pystac.Item], *, relative: bool) -> Path:
    """A static Catalog -> Collection -> items tree on disk; returns the root catalog.json."""
    from pystac.utils import make_relative_href

    catalog = pystac.Catalog("root", "test catalog")
    extent = pystac.Extent(pystac.SpatialExtent([items[0].bbox]), pystac.TemporalExtent([[None, None]]))
    collection = pystac.Collection("s2", "T33UUU", extent)
    catalog.add_child(collection)
    collection.add_items(items)
    catalog.normalize_hrefs(str(folder))
    if relative:
        for item in items:
            for asset in item.assets.values():
                asset.href = make_relative_href(asset.href, item.get_self_href())
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return folder / "catalog.json"


@pytest.mark.parametrize("convention", ["key", "earth_search"])
def test_static_catalog_reads_the_same_pixels_as_the_files(tmp_path, cogs, t33uuu_dir, convention):
    root = save_catalog(tmp_path / "cat", [make_item("S2_T33UUU", cogs, convention)], relative=True)
    assert is_stac_path(root)
    items = read_static_items(root)
    assert [i.id for i in items] == ["S2_T33UUU"]
    stac = catalog_from_items(items, bands=BANDS, provenance={"catalog": str(root)})
    files = build_catalog(t33uuu_dir, bands=BANDS)
    got, ref = stac.catalog, files
    assert got.bands == ref.bands and got.crs == ref.crs and got.res == ref.res == got.gsd == (10.0, 10.0)
    assert got.nodata == ref.nodata and got.offset == ref.offset == 0.0
    (s,), (r,) = got.sources, ref.sources
    assert (s.width, s.height, s.crs) == (r.width, r.height, r.crs) and s.transform.almost_equals(r.transform)
    # channel k of the STAC source is the COG of the band k of the file source
    assert [Path(p).stem for p, _ in s.channels] == [Path(p).stem.rsplit("_", 1)[1] for p, _ in r.channels]
    rng = np.random.default_rng(0)
    for _ in range(4):  # random windows, 10 m and resampled 20/60 m bands alike
        row, col = int(rng.integers(0, r.height - 96)), int(rng.integers(0, r.width - 96))
        a = read_window(s, HandlePool(), row, col, 96, 96)
        b = read_window(r, HandlePool(), row, col, 96, 96)
        assert a.shape == (len(BANDS), 96, 96) and np.array_equal(a, b)
    assert stac.provenance["stac"] == {"catalog": str(root), "items": ["S2_T33UUU"], "skipped_cloudy": [],
                                       "max_cloud": None}


def test_item_collection_and_single_item_files(tmp_path, cogs):
    items = [make_item("a", cogs, "key"), make_item("b", cogs, "earth_search")]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    got = read_static_items(path)
    assert [i.id for i in got] == ["a", "b"]
    stac = catalog_from_items(got, bands=["B04", "B8A"])
    assert [s.name for s in stac.catalog.sources] == ["a", "b"]
    assert [Path(p).stem for p, _ in stac.catalog.sources[1].channels] == ["B04", "B8A"]
    one = tmp_path / "item.json"
    one.write_text(json.dumps(items[0].to_dict()))
    assert [i.id for i in read_static_items(one)] == ["a"]


def test_cloud_cover_filter_skips_and_counts(tmp_path, cogs):
    items = [make_item("clear", cogs, "key", cloud=5.0), make_item("cloudy", cogs, "key", cloud=80.0),
             make_item("hazy", cogs, "earth_search", cloud=30.0), make_item("unknown", cogs, "key")]
    root = save_catalog(tmp_path / "cat", items, relative=False)
    stac = catalog_from_items(read_static_items(root), bands=["B02"], max_cloud=30)
    assert sorted(stac.items) == ["clear", "hazy", "unknown"] and stac.skipped_cloudy == ["cloudy"]
    assert sorted(s.name for s in stac.catalog.sources) == ["clear", "hazy", "unknown"]
    assert any("skipped 1 item(s)" in n and "1 item(s) have no eo:cloud_cover" in n for n in stac.catalog.notes)
    assert stac.provenance["stac"]["skipped_cloudy"] == ["cloudy"]
    assert len(catalog_from_items(read_static_items(root), bands=["B02"]).catalog.sources) == 4
    with pytest.raises(ExploraGeoError, match=r"all 1 STAC item\(s\) have eo:cloud_cover above --max-cloud 10"):
        catalog_from_items([items[1]], bands=["B02"], max_cloud=10)


def test_processing_baseline_sets_the_offset(cogs):
    new = catalog_from_items([make_item("n", cogs, "key", baseline="04.00")], bands=["B02"]).catalog
    assert new.offset == 1000.0 and "04.00" in new.offset_origin
    old = catalog_from_items([make_item("o", cogs, "key", baseline="02.04")], bands=["B02"]).catalog
    assert old.offset == 0.0
    both = [make_item("o", cogs, "key", baseline="03.01"), make_item("n", cogs, "key", baseline="05.09")]
    with pytest.raises(ExploraGeoError, match=r"different DN offsets: o 0 .* n 1000"):
        catalog_from_items(both, bands=["B02"])
    assert catalog_from_items(both, bands=["B02"], dn_offset=1000).catalog.offset == 1000.0


def test_bands_matched_by_eo_bands_name_and_unique_common_name(cogs):
    item = pystac.Item("x", None, None, __import__("datetime").datetime(2020, 1, 1), {})
    path = str(cogs["B02"])
    item.add_asset("band_a", pystac.Asset(path, media_type=pystac.MediaType.GEOTIFF,
                                          extra_fields={"eo:bands": [{"name": "B8A"}]}))
    item.add_asset("band_b", pystac.Asset(path, media_type=pystac.MediaType.GEOTIFF,
                                          extra_fields={"eo:bands": [{"name": "x", "common_name": "swir16"}]}))
    item.add_asset("rgb", pystac.Asset(path, media_type=pystac.MediaType.GEOTIFF, extra_fields={"bands": [
        {"name": "r", "eo:common_name": "red"}, {"name": "g", "eo:common_name": "green"}]}))
    for k in ("e1", "e2"):
        item.add_asset(k, pystac.Asset(path, media_type=pystac.MediaType.GEOTIFF,
                                       extra_fields={"eo:bands": [{"name": k, "common_name": "rededge"}]}))
    item.add_asset("visual", pystac.Asset(path, media_type=pystac.MediaType.COG, roles=["visual"], extra_fields={
        "eo:bands": [{"name": "red", "common_name": "red"}, {"name": "green", "common_name": "green"},
                     {"name": "blue", "common_name": "blue"}]}))
    item.add_asset("blue", pystac.Asset(path.replace(".tif", ".jp2"), media_type="image/jp2"))
    item.add_asset("B02", pystac.Asset(path, media_type=pystac.MediaType.COG))
    from explora_geo.sensors import get_sensor

    s2 = get_sensor("sentinel2")
    assert match_band_assets(item, ["B8A", "B11", "B03", "B04"], s2) == [
        ("band_a", 1), ("band_b", 1), ("rgb", 2), ("rgb", 1)]
    assert match_band_assets(item, ["blue"], s2) == [("B02", 1)]  # two assets are B02: the COG wins
    with pytest.raises(ExploraGeoError, match=r"STAC item x has no asset for band B05 \(raster assets: B02, "
                                              r"band_a, band_b, blue, e1, e2, rgb\)"):
        match_band_assets(item, ["B05"], s2)  # "rededge" is shared by two assets: ambiguous, not matched


def test_gdal_paths():
    assert gdal_path("https://h.org/a/B02.tif") == "/vsicurl/https://h.org/a/B02.tif"
    assert gdal_path("http://h.org/x.tif") == "/vsicurl/http://h.org/x.tif"
    assert gdal_path("s3://sentinel-cogs/tiles/B02.tif") == "/vsis3/sentinel-cogs/tiles/B02.tif"
    assert gdal_path("gs://bucket/k.tif") == "/vsigs/bucket/k.tif"
    assert gdal_path("file:///data/a%20b.tif") == "/data/a b.tif"
    assert gdal_path("/data/x.tif") == "/data/x.tif"
    assert gdal_path("/vsis3/b/k.tif") == "/vsis3/b/k.tif"


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------

def test_missing_band_asset_names_item_and_band(cogs):
    with pytest.raises(ExploraGeoError, match=r"STAC item short has no asset for band B8A \(raster assets: "):
        catalog_from_items([make_item("short", cogs, "earth_search", drop=("B8A",))], bands=["B02", "B8A"])


@pytest.mark.parametrize("doc", [
    {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None, "properties": {}}]},
    {"type": "Catalog", "id": "x"},
    {"hello": "world"},
    [1, 2],
])
def test_json_that_is_not_stac(tmp_path, doc):
    path = tmp_path / "thing.json"
    path.write_text(json.dumps(doc))
    assert is_stac_path(path)
    with pytest.raises(ExploraGeoError, match=r"thing.json is not a STAC document"):
        read_static_items(path)
    path.write_text("{not json")
    with pytest.raises(ExploraGeoError, match=r"thing.json is not JSON"):
        read_static_items(path)


def test_broken_child_link_and_empty_catalog(tmp_path, cogs):
    root = save_catalog(tmp_path / "cat", [make_item("a", cogs, "key")], relative=True)
    (tmp_path / "cat" / "s2" / "collection.json").unlink()
    with pytest.raises(ExploraGeoError, match=r"cannot read the STAC catalog .*cat/catalog.json .*s2/collection.json"):
        read_static_items(root)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(pystac.Catalog("e", "empty").to_dict(include_self_link=False)))
    with pytest.raises(ExploraGeoError, match="holds no item"):
        read_static_items(empty)


@pytest.mark.parametrize("href", ["missing", "corrupt", "http://127.0.0.1:9/nowhere/B02.tif"])
def test_unreadable_href_is_named(tmp_path, cogs, href):
    if href == "missing":
        href = str(tmp_path / "gone" / "B02.tif")
    elif href == "corrupt":
        (tmp_path / "B02.tif").write_bytes(b"II*\x00garbage")
        href = str(tmp_path / "B02.tif")
    item = make_item("bad", cogs, "key")
    item.assets["B02"].href = href
    with pytest.raises(ExploraGeoError) as err:
        catalog_from_items([item], bands=["B03", "B02"])
    message = str(err.value)
    assert f"STAC item bad asset B02 ({href})" in message and "\n" not in message


def test_search_unreachable_fails_in_one_line():
    with pytest.raises(ExploraGeoError) as err:
        search_items("http://127.0.0.1:9/", collections=["sentinel-2-l2a"], bbox=[12, 52, 13, 53],
                     datetime="2023-06-01/2023-06-30", timeout=5)
    message = str(err.value)
    assert message.startswith("the STAC search of http://127.0.0.1:9/ (collection sentinel-2-l2a, bbox 12,52,13,53")
    assert "failed" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------
# search through a local STAC API (pystac-client over HTTP on 127.0.0.1)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture()
def stac_api(cogs):
    """A minimal STAC API (landing page + POST /search with collections and the query extension)."""
    items = {"s2": [make_item("clear", cogs, "earth_search", cloud=3.0),
                    make_item("cloudy", cogs, "earth_search", cloud=90.0)]}
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def reply(self, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            base = f"http://127.0.0.1:{self.server.server_port}"
            self.reply({"type": "Catalog", "id": "api", "description": "test", "stac_version": "1.0.0",
                        "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                       "https://api.stacspec.org/v1.0.0/item-search",
                                       "https://api.stacspec.org/v1.0.0/item-search#query"],
                        "links": [{"rel": "self", "href": base + "/"}, {"rel": "root", "href": base + "/"},
                                  {"rel": "search", "href": base + "/search", "method": "POST",
                                   "type": "application/geo+json"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            found = [i for c in body.get("collections", []) for i in items.get(c, [])]
            limit = body.get("query", {}).get("eo:cloud_cover", {}).get("lte")
            if limit is not None:
                found = [i for i in found if i.properties["eo:cloud_cover"] <= limit]
            self.reply({"type": "FeatureCollection", "features": [i.to_dict() for i in found], "links": []})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/", requests
    server.shutdown()
    server.server_close()


def test_search_finds_items_and_sends_the_parameters(stac_api):
    url, requests = stac_api
    found = search_items(url, collections=["s2"], bbox=[12.0, 52.0, 13.0, 53.0], datetime="2017-02-01/2017-02-28")
    assert [i.id for i in found] == ["clear", "cloudy"]
    assert requests[-1]["bbox"] == [12.0, 52.0, 13.0, 53.0] and requests[-1]["collections"] == ["s2"]
    assert requests[-1]["datetime"].startswith("2017-02-01T00:00:00")
    found = search_items(url, collections=["s2"], max_cloud=20)
    assert [i.id for i in found] == ["clear"] and requests[-1]["query"] == {"eo:cloud_cover": {"lte": 20}}
    stac = catalog_from_items(found, bands=["B04", "nir08"], provenance={"search": {"url": url}})
    assert stac.items == ["clear"] and stac.provenance["stac"]["search"] == {"url": url}


def test_search_that_returns_nothing_says_what_was_searched(stac_api):
    url, _ = stac_api
    with pytest.raises(ExploraGeoError, match=rf"the STAC search of {url} \(collection nothing-here, "
                                              r"bbox 1,2,3,4, datetime 2020-01-01/2020-02-01\) returned no item"):
        search_items(url, collections=["nothing-here"], bbox=[1, 2, 3, 4], datetime="2020-01-01/2020-02-01")


# ----------------------------------------------------------------------------------------------------------
# the command-line flags (explora_geo.cli._stac)
# ----------------------------------------------------------------------------------------------------------

def parse(*argv: str):
    import argparse

    from explora_geo.cli._stac import add_stac_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=None)
    add_stac_arguments(parser)
    return parser.parse_args(argv)


def from_args(*argv: str, bands=("B02", "B8A")):
    from explora_geo.cli._stac import stac_input_from_args

    return stac_input_from_args(parse(*argv), bands=list(bands), sensor="sentinel2")


def test_flags_static_catalog_and_plain_rasters(tmp_path, cogs, t33uuu_dir):
    root = save_catalog(tmp_path / "cat", [make_item("a", cogs, "key", cloud=50.0)], relative=True)
    got = from_args("--data", str(root))
    assert got.items == ["a"] and got.provenance["stac"]["catalog"] == str(root)
    with pytest.raises(ExploraGeoError, match="all 1 STAC item"):
        from_args("--data", str(root), "--max-cloud", "20")
    assert from_args("--data", str(t33uuu_dir)) is None
    with pytest.raises(ExploraGeoError, match=r"--data mixes STAC documents \(.*catalog.json\) and rasters"):
        from_args("--data", str(root), str(t33uuu_dir))
    with pytest.raises(ExploraGeoError, match="--max-cloud only applies to STAC input"):
        from_args("--data", str(t33uuu_dir), "--max-cloud", "20")
    with pytest.raises(ExploraGeoError, match="--bbox, --datetime only apply to a STAC search"):
        from_args("--data", str(root), "--bbox", "1,2,3,4", "--datetime", "2020")
    with pytest.raises(ExploraGeoError, match="either --data or --stac-search"):
        from_args("--data", str(root), "--stac-search", "http://127.0.0.1:9/")


@pytest.mark.parametrize("bbox", ["1,2,3", "a,b,c,d", "1,60,3,50", "200,1,210,2"])
def test_flags_bad_bbox(bbox):
    with pytest.raises(ExploraGeoError, match=rf"--bbox '{bbox}' is not"):
        from_args("--stac-search", "http://127.0.0.1:9/", "--bbox", bbox)


def test_flags_search(stac_api):
    url, requests = stac_api
    got = from_args("--stac-search", url, "--collection", "s2", "--bbox", "12,52,13,53", "--datetime",
                    "2017-02-01/2017-02-28", "--max-cloud", "50", "--max-items", "5")
    assert got.items == ["clear"] and requests[-1]["query"] == {"eo:cloud_cover": {"lte": 50.0}}
    assert got.provenance["stac"]["search"] == {
        "url": url, "collections": ["s2"], "bbox": [12.0, 52.0, 13.0, 53.0], "datetime": "2017-02-01/2017-02-28",
        "max_cloud": 50.0, "max_items": 5}
    with pytest.raises(ExploraGeoError, match=r"^the STAC search of http://127.0.0.1:9/ .*Connection refused"):
        from_args("--stac-search", "http://127.0.0.1:9/", "--collection", "s2")


# ----------------------------------------------------------------------------------------------------------
# COGs over HTTP (GDAL /vsicurl/ with range requests, served on 127.0.0.1)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture()
def cog_server(cogs):
    """An HTTP server of the COG folder that answers range requests, as object stores do."""
    import re

    root = cogs["B02"].parent
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def serve(self, head: bool) -> None:
            path = root / self.path.split("?", 1)[0].lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            seen.append(self.path)
            data = path.read_bytes()
            match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
                body = data[start:end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                body = data
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self):
            self.serve(head=False)

        def do_HEAD(self):
            self.serve(head=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def remote_item(item_id: str, cogs: dict[str, Path], base: str) -> pystac.Item:
    item = make_item(item_id, cogs, "earth_search")
    for asset in item.assets.values():
        asset.href = f"{base}/{Path(asset.href).name}"
    return item


def test_http_hrefs_read_through_vsicurl(cogs, cog_server, t33uuu_dir):
    base, seen = cog_server
    stac = catalog_from_items([remote_item("remote", cogs, base)], bands=["B04", "B8A"])
    (source,) = stac.catalog.sources
    assert [p for p, _ in source.channels] == [f"/vsicurl/{base}/B04.tif", f"/vsicurl/{base}/B8A.tif"]
    (ref,) = build_catalog(t33uuu_dir, bands=["B04", "B8A"]).sources
    assert source.transform.almost_equals(ref.transform) and (source.width, source.height) == (ref.width, ref.height)
    got = read_window(source, HandlePool(), 100, 200, 64, 64)
    assert np.array_equal(got, read_window(ref, HandlePool(), 100, 200, 64, 64))
    assert "/B8A.tif" in seen  # the pixels came over HTTP


# ----------------------------------------------------------------------------------------------------------
# explora-geo prepare from STAC
# ----------------------------------------------------------------------------------------------------------

def _prepare(tmp_path: Path, name: str, *args: str) -> tuple[int, dict, list[dict]]:
    """Run ``explora-geo prepare`` in-process; return (status, store metadata, samples in store order)."""
    from litdata import StreamingDataset

    from explora_geo.cli import main

    out = tmp_path / name
    status = main(["prepare", *args, "--out", str(out), "--patches", "6", "--patch-size", "48", "--workers", "1",
                   "--seed", "7"])
    meta = json.loads((out / "explora-store.json").read_text())
    return status, meta, [StreamingDataset(str(out))[i] for i in range(meta["counts"]["written"])]


PREPARE_BANDS = "B02,B8A,B01,B11"


@pytest.fixture(scope="module")
def files_store(tmp_path_factory, t33uuu_dir):
    """``prepare`` from the T33UUU JP2 files: (metadata, samples)."""
    _, meta, samples = _prepare(tmp_path_factory.mktemp("files"), "files", "--data", str(t33uuu_dir), "--bands",
                                PREPARE_BANDS)
    return meta, samples


@pytest.mark.slow
def test_prepare_from_stac_gives_the_files_patches(tmp_path, cogs, files_store, capsys):
    bands = PREPARE_BANDS
    meta_files, want = files_store
    key = save_catalog(tmp_path / "cat_key", [make_item("S2_key", cogs, "key", cloud=1.0)], relative=True)
    es = tmp_path / "earth_search.json"
    es.write_text(json.dumps(pystac.ItemCollection([
        make_item("S2_es", cogs, "earth_search", cloud=2.0), make_item("S2_cloudy", cogs, "key", cloud=95.0),
    ]).to_dict()))
    for name, data in (("stac_key", key), ("stac_es", es)):
        status, meta, got = _prepare(tmp_path, name, "--data", str(data), "--bands", bands, "--max-cloud", "50")
        assert status == 0 and meta["counts"] == meta_files["counts"] and meta["bands"] == ["B02", "B8A", "B01", "B11"]
        assert len(got) == len(want) == 6
        for a, b in zip(got, want, strict=True):  # the same windows, the same raw pixels (10/20/60 m bands)
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            assert np.allclose(np.asarray(a["bounds"], dtype=float), np.asarray(b["bounds"], dtype=float))
        assert meta["stats"]["mean"] == pytest.approx(meta_files["stats"]["mean"])
        stac = meta["provenance"]["stac"]
        assert stac["catalog"] == str(data) and stac["max_cloud"] == 50.0
        assert stac["items"] == ["S2_key"] if name == "stac_key" else (stac["items"] == ["S2_es"]
                                                                        and stac["skipped_cloudy"] == ["S2_cloudy"])
    assert "skipped 1 item(s) with eo:cloud_cover above 50" in capsys.readouterr().err


def test_prepare_stac_errors_are_one_line(tmp_path, cogs, capsys):
    from explora_geo.cli import main

    common = ["--bands", "B02,B8A", "--out", str(tmp_path / "out"), "--patches", "2", "--patch-size", "32"]
    bad = tmp_path / "not_stac.json"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    short = tmp_path / "short.json"
    short.write_text(json.dumps(make_item("short", cogs, "key", drop=("B8A",)).to_dict()))
    cases = [
        (["--data", str(bad)], "not_stac.json is not a STAC document"),
        (["--data", str(short)], "STAC item short has no asset for band B8A"),
        (["--stac-search", "http://127.0.0.1:9/", "--collection", "sentinel-2-l2a"],
         "the STAC search of http://127.0.0.1:9/ (collection sentinel-2-l2a) failed"),
        ([], "no input given; pass --data PATH... or --stac-search URL."),
    ]
    for argv, message in cases:
        assert main(["prepare", *argv, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("explora-geo prepare: error: ") and message in err and "\n" not in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prepare_from_http_hrefs(tmp_path, cogs, cog_server, files_store):
    base, seen = cog_server
    path = tmp_path / "remote.json"
    path.write_text(json.dumps(remote_item("remote", cogs, base).to_dict()))
    _, want = files_store
    status, meta, got = _prepare(tmp_path, "remote", "--data", str(path), "--bands", PREPARE_BANDS)
    assert status == 0 and meta["files"] == sorted(f"/vsicurl/{base}/{b}.tif" for b in PREPARE_BANDS.split(","))
    assert len(got) == len(want) == 6
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert "/B8A.tif" in seen


def test_items_in_geographic_and_other_crs_keep_their_own_grids(tmp_path, cogs):
    """An EPSG:4326 item is cut in its UTM zone at the catalog's GSD; a UTM item keeps its native grid."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    geo = {}
    for band in ("B02", "B8A"):
        with rasterio.open(cogs[band]) as src:
            transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                                   *src.bounds)
            data = np.zeros((1, height, width), dtype=src.dtypes[0])
            reproject(src.read(), data, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                      dst_crs="EPSG:4326", resampling=Resampling.nearest)
        geo[band] = tmp_path / f"{band}.tif"
        with rasterio.open(geo[band], "w", driver="COG", width=width, height=height, count=1,
                           dtype=data.dtype, crs="EPSG:4326", transform=transform) as dst:
            dst.write(data)
    utm = make_item("utm", {b: cogs[b] for b in ("B02", "B8A")}, "key")
    wgs = make_item("wgs84", geo, "key")
    stac = catalog_from_items([utm, wgs], bands=["B02", "B8A"])
    cat = stac.catalog
    assert cat.crs.to_epsg() == 32633 and cat.gsd == (10.0, 10.0)
    by_name = {s.name: s for s in cat.sources}
    assert by_name["utm"].crs.to_epsg() == 32633 and by_name["utm"].transform.a == 10.0
    assert by_name["wgs84"].crs.to_epsg() == 32633 and by_name["wgs84"].transform.a == pytest.approx(10.0)
    assert any("geographic CRS read through their UTM zone" in n and "wgs84" in n for n in cat.notes)
    patch = read_window(by_name["wgs84"], HandlePool(), 200, 200, 32, 32)
    assert patch.shape == (2, 32, 32) and patch.std(axis=(1, 2)).min() > 0

"""Prepared patch stores: the format, and finding / reading one in a folder or at an object-store URL.

A store is a LitData "optimized" dataset (``index.json`` + ``chunk-*.bin``, written by ``litdata.optimize``)
plus two JSON files beside the index:

- ``stats.json``: per-band statistics of the written patches (the ``explora-geo stats`` schema, so
  :func:`~explora_geo.data.stats.normalization_from_stats` and ``pretrain --stats`` read it);
- ``explora-store.json``: the store's metadata (:data:`STORE_FORMAT`, bands, patch size, GSD, sensor, nodata,
  DN offset, statistics, counts, provenance). It is written LAST: a store without it is incomplete (an
  interrupted prepare) and is refused.

Each sample is a dict: ``image`` ``[C, H, W]`` in the file's dtype (raw digital numbers, bands in the store's
order), ``valid_mask`` bool ``[H, W]``, ``source`` (the file's path as UTF-8 bytes, read back as a ``memoryview``:
``bytes(x).decode()``; LitData would read a ``str`` ending in ``.tif`` as an image file), ``source_index`` (its position in the
metadata's ``files``), ``crs`` (e.g. ``"EPSG:32633"``), ``bounds`` float64 ``[4]`` (left, bottom, right, top
in ``crs``) and ``patch_id`` (unique in the store).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explora_geo.atomic import write_text_atomic
from explora_geo.errors import ExploraGeoError

__all__ = [
    "INDEX_FILE",
    "METADATA_FILE",
    "NODES_DIR",
    "STATS_FILE",
    "STORE_FORMAT",
    "STORE_VERSION",
    "URL_SCHEMES",
    "is_url",
    "looks_like_store",
    "read_store_metadata",
    "store_band_indexes",
    "store_stats_for",
    "url_exists",
    "write_store_file",
]

STORE_FORMAT = "explora-geo-patch-store"
STORE_VERSION = 1
METADATA_FILE = "explora-store.json"
STATS_FILE = "stats.json"
INDEX_FILE = "index.json"
#: Folder inside a store where the nodes of a multi-node prepare leave their reports and failure notes.
NODES_DIR = ".explora-prepare"
#: Object stores LitData reads and writes.
URL_SCHEMES: tuple[str, ...] = ("s3://", "gs://", "r2://")


def is_url(path: Any) -> bool:
    """True when ``path`` is an object-store URL (``s3://``, ``gs://``, ``r2://``)."""
    return isinstance(path, str) and path.startswith(URL_SCHEMES)


def looks_like_store(data: Any) -> bool:
    """True when ``data`` (a ``--data`` value) names a prepared store: a URL, or a folder holding
    ``explora-store.json``, a LitData ``index.json`` or the notes of a multi-node prepare."""
    if isinstance(data, (list, tuple)):
        if len(data) != 1:
            return False
        data = data[0]
    if not isinstance(data, (str, os.PathLike)):
        return False
    if is_url(os.fspath(data)):
        return True
    folder = Path(data)
    return folder.is_dir() and ((folder / METADATA_FILE).is_file() or (folder / INDEX_FILE).is_file()
                                or (folder / NODES_DIR).is_dir())


def _join(store: str, name: str) -> str:
    return store.rstrip("/") + "/" + name


def _provider(url: str, storage_options: dict[str, Any] | None) -> Any:
    """An object-store client with ``exists`` / ``download_file`` / ``upload_file``.

    ``s3://`` uses boto3 with few retries and short timeouts, so an unreachable store fails in seconds (LitData's
    own S3 client retries up to 1000 times); ``gs://`` and ``r2://`` use LitData's providers.
    """
    if url.startswith("s3://"):
        return _S3(storage_options or {})
    from litdata.streaming.fs_provider import _get_fs_provider

    return _get_fs_provider(url, storage_options or {})


class _S3:
    """The three S3 calls a store needs, through boto3 (``storage_options`` are ``boto3.client`` arguments)."""

    def __init__(self, storage_options: dict[str, Any]) -> None:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        self.client = boto3.client("s3", config=config, **storage_options)

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        bucket, _, key = url[len("s3://"):].partition("/")
        return bucket, key

    def exists(self, url: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self._split(url)[0], Key=self._split(url)[1])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def download_file(self, url: str, local: str) -> None:
        self.client.download_file(*self._split(url), local)

    def upload_file(self, local: str, url: str) -> None:
        self.client.upload_file(local, *self._split(url))


def _unreachable(url: str, err: BaseException) -> ExploraGeoError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return ExploraGeoError(f"cannot reach store {url} ({type(err).__name__}: {first}); check the URL, the "
                           "network and the object-store credentials (e.g. AWS_PROFILE / AWS_ENDPOINT_URL).")


def url_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the object at ``url`` exists.

    Raises:
        ExploraGeoError: the object store cannot be reached (network, credentials, bucket).
    """
    try:
        return bool(_provider(url, storage_options).exists(url))
    except ExploraGeoError:
        raise
    except Exception as err:  # botocore / google errors of every kind
        raise _unreachable(url, err) from err


def read_store_metadata(store: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """The ``explora-store.json`` of ``store`` (a folder or a URL).

    Raises:
        ExploraGeoError: a missing folder, an unreachable URL, an incomplete store (no metadata: an
            interrupted prepare), or a file that is not a store's metadata.
    """
    text = os.fspath(store)
    if is_url(text):
        marker = _join(text, METADATA_FILE)
        if not url_exists(marker, storage_options):
            raise ExploraGeoError(f"store {text} has no {METADATA_FILE}: it is incomplete (an interrupted "
                                  "prepare?) or not a store; run `explora-geo prepare` again with --overwrite.")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, METADATA_FILE)
            try:
                _provider(marker, storage_options).download_file(marker, local)
            except Exception as err:
                raise _unreachable(text, err) from err
            raw = Path(local).read_text()
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise ExploraGeoError(f"store {text} does not exist; run `explora-geo prepare --out {text}` first.")
        meta_path = folder / METADATA_FILE
        if not meta_path.is_file():
            if (folder / NODES_DIR).is_dir():
                raise ExploraGeoError(f"{text} has no {METADATA_FILE}: it is incomplete (a multi-node prepare failed "
                                      f"or is still running; its nodes' notes are in {NODES_DIR}/); delete it and "
                                      "run `explora-geo prepare` again on every node.")
            what = "it is incomplete (an interrupted prepare?)" if (folder / INDEX_FILE).exists() else "not a store"
            raise ExploraGeoError(f"{text} has no {METADATA_FILE}: {what}; run `explora-geo prepare` again "
                                  "with --overwrite.")
        raw = meta_path.read_text()
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ExploraGeoError(f"{METADATA_FILE} of {text} is not JSON ({err}); prepare the store again.") from err
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise ExploraGeoError(f"{text} is not an explora-geo patch store ({METADATA_FILE} has another format); "
                              "prepare one with `explora-geo prepare`.")
    if int(meta.get("format_version", 0)) > STORE_VERSION:
        raise ExploraGeoError(f"store {text} has format version {meta['format_version']}, newer than this "
                              f"explora-geo reads ({STORE_VERSION}); upgrade explora-geo.")
    return meta


def write_store_file(store: str | os.PathLike[str], name: str, text: str,
                     storage_options: dict[str, Any] | None = None) -> str:
    """Write ``text`` to ``store/name``: atomically in a folder, as one upload at a URL. Returns the path."""
    target = _join(os.fspath(store), name)
    if not is_url(os.fspath(store)):
        write_text_atomic(target, text)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        Path(local).write_text(text, encoding="utf-8")
        try:
            _provider(target, storage_options).upload_file(local, target)
        except Exception as err:
            raise _unreachable(os.fspath(store), err) from err
    return target


def store_band_indexes(meta: dict[str, Any], bands: Sequence[str], store: str) -> list[int]:
    """Positions of ``bands`` (by name) in the store's bands.

    Raises:
        ExploraGeoError: a requested band is not in the store (names both sets).
    """
    from explora_geo.sensors import canonical_band_name

    have = [canonical_band_name(b) for b in meta["bands"]]
    want = [canonical_band_name(b) for b in bands]
    missing = [b for b in want if b not in have]
    if missing:
        raise ExploraGeoError(
            f"store {store} holds bands {','.join(meta['bands'])} but the model needs {','.join(bands)} "
            f"({','.join(missing)} missing); prepare a store with those bands or pass --bands matching the store."
        )
    return [have.index(b) for b in want]


def store_stats_for(data: Any, stats: Any, normalization: str, bands: Any = None) -> Any:
    """The statistics a pre-training on ``data`` uses: ``stats`` when given; for a prepared store with
    ``satmae`` / ``meanstd`` scaling, the store's own (the path of its ``stats.json``, or for a URL the
    statistics themselves); else ``None``.

    Also checks a store early (before any model is built): unreachable, incomplete, or (when ``bands`` lists
    band names) lacking some of ``bands``.

    Raises:
        ExploraGeoError: see :func:`read_store_metadata` and :func:`store_band_indexes`.
    """
    if data is None or not looks_like_store(data):
        return stats
    store = os.fspath(data[0] if isinstance(data, (list, tuple)) else data)
    meta = read_store_metadata(store)
    from explora_geo.sensors import SENSORS

    if isinstance(bands, str) and bands.strip().lower().replace("-", "_") not in SENSORS:
        store_band_indexes(meta, [b.strip() for b in bands.split(",") if b.strip()], store)
    if stats is not None or normalization not in ("satmae", "meanstd"):
        return stats
    return meta["stats"] if is_url(store) else str(Path(store) / STATS_FILE)

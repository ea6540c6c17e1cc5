"""Rewrite the metadata of an ONNX file without the ``onnx`` package (QGIS's Python does not ship it).

An ONNX file is one serialised ``ModelProto`` protobuf message. Its top-level fields are walked in the
protobuf wire format, every ``metadata_props`` entry (field 14, ``StringStringEntryProto {key = 1; value =
2}``) is dropped and the new entries are appended; every other field (the graph, opsets, producer) is copied
byte for byte, so the network is untouched. Protobuf parsers accept fields in any order.

:func:`write_head_bundle` uses this to save a few-shot classifier: the source bundle's graph with its
metadata turned into a classifier's, the fitted :class:`~.linear_head.LinearHead` stored as ``linear_head``
(the plugin applies it to the ``embedding`` output), and the same metadata as the ``.json`` sidecar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import PluginError
from .linear_head import LinearHead
from .writers import atomic_path

METADATA_PROPS = 14  # ModelProto.metadata_props
_LEN = 2  # wire type of length-delimited fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(len(payload)) + payload


def top_level_fields(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, start, end)`` of each top-level field of a serialised message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf) or field == 0:
            raise ValueError("truncated or malformed protobuf message")
        yield field, wire, start, pos


def replace_metadata(model: bytes, props: Mapping[str, str]) -> bytes:
    """The serialised ONNX ``model`` with its ``metadata_props`` replaced by ``props`` (string -> string)."""
    kept = [model[start:end] for field, _, start, end in top_level_fields(model) if field != METADATA_PROPS]
    entries = [_length_delimited(METADATA_PROPS, _length_delimited(1, str(k).encode("utf-8"))
                                 + _length_delimited(2, str(v).encode("utf-8"))) for k, v in props.items()]
    return b"".join(kept + entries)


def head_bundle_metadata(source: Mapping[str, Any], head: LinearHead, class_names: Sequence[str],
                         class_colors: Sequence[str], provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata (decoded values) of a classifier bundle made of ``source``'s network and a fitted ``head``.

    ``source`` is the decoded metadata of the bundle whose embedding the head reads; its band, scaling, GSD and
    tile entries are kept, its class entries replaced.
    """
    drop = {"class_names", "class_colors", "linear_head", "segmentation"}
    meta = {k: v for k, v in source.items() if k not in drop}
    explora = dict(meta.get("explora") or {})
    explora["head"] = dict(provenance)
    meta.update({"model_type": "classifier", "class_names": list(class_names), "class_colors": list(class_colors),
                 "explora": explora, "linear_head": head.to_metadata(), "outputs": ["embedding", "probabilities"]})
    return meta


def write_head_bundle(source_onnx: str | Path, out: str | Path, meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``out`` (``.onnx``: ``source_onnx``'s graph with ``meta`` as its metadata) and ``out``'s ``.json``
    sidecar, each atomically.

    Raises:
        PluginError: ``out`` does not end in ``.onnx``, or ``source_onnx`` is not a readable ONNX file.
    """
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise PluginError(f"the model output {out} must end in .onnx; choose e.g. {out.with_suffix('.onnx').name}.")
    try:
        data = Path(source_onnx).read_bytes()
        rewritten = replace_metadata(data, {k: json.dumps(v) for k, v in meta.items()})
    except (OSError, ValueError) as err:
        raise PluginError(f"cannot rewrite the model file {source_onnx} ({err}); re-export it with "
                          "'explora-geo export'.") from err
    sidecar = out.with_suffix(".json")
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(rewritten)
        with atomic_path(sidecar) as tmp_json:
            Path(tmp_json).write_text(json.dumps(dict(meta), indent=2))
    return out, sidecar

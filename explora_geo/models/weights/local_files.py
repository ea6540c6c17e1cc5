"""Local checkpoint files: torch pickles, safetensors (with an explora-geo backbone sidecar), and the
containers and key prefixes training frameworks wrap a ViT encoder in."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from explora_geo.errors import ExploraGeoError
from explora_geo.models.weights.report import WEIGHTS_HINT, SourceCheckpoint, StateDict

__all__ = ["ANCHOR", "FILE_SUFFIXES", "read_checkpoint_file", "unwrap_state_dict"]

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pth.tar")
ANCHOR = "blocks.0.norm1.weight"


def read_checkpoint_file(path: str | os.PathLike[str]) -> SourceCheckpoint:
    """Read a local checkpoint: ``.safetensors`` (+ explora-geo ``.json`` sidecar) or a torch pickle.

    Raises:
        ExploraGeoError: missing, unreadable or corrupt file (named).
    """
    path = Path(path)
    if path.is_dir():
        raise ExploraGeoError(f"weights path {path} is a folder; pass the checkpoint file inside it "
                              "(e.g. model.safetensors), or --weights random for a smoke run.")
    if not path.is_file():
        raise ExploraGeoError(f"weights file {path} does not exist; {WEIGHTS_HINT}.")
    meta: dict[str, Any] = {}
    bands: list[str] | None = None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
            meta, bands = _backbone_sidecar(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except ExploraGeoError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file, reported by name
        reason = " ".join(str(err).split())[:160]
        raise ExploraGeoError(
            f"cannot read weights file {path} ({type(err).__name__}: {reason}); the file is corrupt or not a "
            "PyTorch/safetensors checkpoint: re-download it or pass another file."
        ) from err
    if not isinstance(raw, dict):
        raise ExploraGeoError(f"weights file {path} holds a {type(raw).__name__}, not a state dict; "
                              "save model.state_dict() instead.")
    return SourceCheckpoint(raw, str(path), meta, bands)


def _backbone_sidecar(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """``(meta, bands)`` from the explora-geo sidecar beside ``path`` (``{}, None`` when there is none)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}, None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}, None  # not ours: a stray JSON file beside the weights
    if not isinstance(data, dict) or data.get("format") != "explora-geo-backbone":
        return {}, None
    from explora_geo.sidecar import read_sidecar

    data = read_sidecar(path)
    meta = {"sidecar": data, "bands": data["bands"], "normalization": data.get("normalization")}
    return meta, list(data["bands"])


def unwrap_state_dict(raw: dict[str, Any]) -> tuple[StateDict, list[str]]:
    """Find the ViT encoder in a checkpoint: unwrap containers and strip prefixes.

    Containers tried in order: ``teacher`` (DINO/DINOv2 training files), ``model`` (MAE), ``state_dict``
    (Lightning), ``module``. The encoder is located by its ``blocks.0.norm1.weight`` key; its prefix
    (``module.``, ``backbone.``, ``model.``, ``teacher.backbone.`` ...) is removed. When several prefixes
    qualify, one containing ``teacher`` is preferred, then ``backbone``, then the shortest.

    Returns:
        ``(state_dict, ignored)``: the tensors under the encoder prefix, un-prefixed (an MAE decoder saved
        beside the encoder, e.g. ``module.decoder_embed.weight``, comes along), and the keys left out.
    """
    obj: Any = raw
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and ANCHOR not in obj:
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    prefixes = [k[: -len(ANCHOR)] for k in tensors if k.endswith(ANCHOR)]
    if not prefixes:
        return tensors, []
    prefix = sorted(prefixes, key=lambda p: ("teacher" not in p, "backbone" not in p, len(p)))[0]
    if not prefix:
        return tensors, []
    out: StateDict = {}
    ignored: list[str] = []
    for k, v in tensors.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        else:
            ignored.append(k)
    return out, ignored

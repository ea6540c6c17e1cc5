"""timm pretrained names (``vit_large_patch14_dinov2.lvd142m``): the Hugging Face cache first, then torch.hub's
cache of the config URL; a download only when the host answers (an offline machine fails in seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from explora_geo.errors import ExploraGeoError
from explora_geo.models.weights.local_files import read_checkpoint_file
from explora_geo.models.weights.report import WEIGHTS_HINT, SourceCheckpoint

__all__ = ["offline", "reachable", "timm_checkpoint"]


def timm_checkpoint(name: str) -> SourceCheckpoint:
    """A timm pretrained name, through its pretrained cfg: the HF hub cache first, then torch.hub's."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ExploraGeoError(f"timm has no pretrained weights called {name!r}; {WEIGHTS_HINT}.")
    meta = {"input_size": list(cfg.input_size), "normalization": {"mean": list(cfg.mean), "std": list(cfg.std)},
            "license": cfg.license}
    if cfg.file:
        found = read_checkpoint_file(cfg.file)
        return SourceCheckpoint(found.raw, f"{name} ({cfg.file})", meta)
    failures: list[str] = []
    if cfg.hf_hub_id:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            cached_file = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(cached_file, str):
                found = read_checkpoint_file(cached_file)
                return SourceCheckpoint(found.raw, f"{name} (hf-hub cache {repo}/{filename})", meta)
        online = not offline() and reachable(constants.ENDPOINT)
        if not online:
            failures.append(f"{constants.ENDPOINT} not reachable")
        for filename in names if online else ():
            try:
                local = hf_hub_download(repo, filename, revision=revision or None)
            except Exception as err:  # noqa: BLE001 - offline / not cached / missing entry: try the next one
                failures.append(type(err).__name__)
                continue
            found = read_checkpoint_file(local)
            return SourceCheckpoint(found.raw, f"{name} (hf-hub {repo}/{filename})", meta)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return SourceCheckpoint(read_checkpoint_file(cached).raw, f"{name} ({cached})", meta)
        if not offline() and reachable(cfg.url):
            try:
                raw = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", progress=True,
                                                         weights_only=True)
                return SourceCheckpoint(raw, f"{name} ({cfg.url})", meta)
            except Exception as err:  # noqa: BLE001 - no network
                failures.append(type(err).__name__)
    raise ExploraGeoError(
        f"weights {name!r} are not in the local Hugging Face / torch.hub cache and cannot be downloaded "
        f"({', '.join(failures) or 'offline'}); {WEIGHTS_HINT}."
    )


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout_s``.

    Checked before a download so that an offline machine fails in seconds with one clear line, instead of
    after a minute of the hub clients' retries and their own log lines.
    """
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False

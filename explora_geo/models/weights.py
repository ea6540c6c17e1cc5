"""Source weights: find a pre-trained checkpoint, convert it, and load it strictly into a backbone.

``load_source_weights(model, spec)`` accepts:

- ``"random"``: no weights (the report says so loudly);
- a local file: ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``
  (with an explora-geo ``.json`` sidecar when it is a merged backbone). Containers (``model``,
  ``state_dict``, ``teacher``) and prefixes (``module.``, ``backbone.``, Lightning's ``model.`` ...) are
  unwrapped by locating the ViT blocks; official DINOv2 files (``mask_token``, ``register_tokens``,
  LayerScale) and MAE files (with or without the decoder) are recognised;
- a timm pretrained name (``vit_large_patch14_dinov2.lvd142m``), resolved through timm's pretrained config
  and the Hugging Face cache (``HF_HUB_OFFLINE=1`` works when the file is cached);
- a torchgeo weight name (``ViTSmall16_Weights.SENTINEL2_ALL_DINO``), resolved through torch.hub's cache.

Loading is strict about the transformer: a missing or mis-shaped block / norm / cls key is an
:class:`~explora_geo.errors.ExploraGeoError`. Only legitimately new parts may be initialised (the head;
for a group-channel ViT loaded from a plain ViT: the group patch embeddings' non-RGB kernels, the
position and group encodings), and the :class:`LoadReport` lists every key. Some differences are
converted rather than refused: LayerScale is folded into the preceding linear layers or set to 1 (exact),
position grids and patch kernels are resampled with timm's functions, and input channels are mapped by
band name.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.models.group_channel_vit import GroupChannelViT
from explora_geo.models.group_channel_vit import checkpoint_filter_fn as group_channel_filter
from explora_geo.sensors import get_sensor, select_bands

__all__ = [
    "LoadReport",
    "SourceCheckpoint",
    "load_source_weights",
    "resolve_source",
    "read_checkpoint_file",
    "unwrap_state_dict",
    "split_extra",
    "band_kernels",
    "infer_sensor",
    "match_layer_scale",
    "rgb_to_group_kernels",
]

StateDict = dict[str, torch.Tensor]
OtherKernels = Literal["mean", "random"]

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pth.tar")
_WEIGHTS_HINT = "pass --weights PATH (a local checkpoint file) or --weights random for a smoke run"
_ANCHOR = "blocks.0.norm1.weight"
_HEADS = frozenset({"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"})
# Keys a ViT of another architecture would not share; a mismatch there is an error, never a silent re-init.
_STRICT = re.compile(r"^(blocks\.|norm\.|cls_token$|reg_token$|patch_embed\.|pos_embed$)")


@dataclass
class LoadReport:
    """What :func:`load_source_weights` did.

    Attributes:
        source: the spec as given, resolved (file path / timm name / torchgeo name / ``random``).
        loaded_keys: model keys whose values come from the checkpoint (possibly converted / resampled).
        new_keys: model keys left newly initialised (head, group-channel embeddings ...).
        resampled_keys: keys interpolated to the model's geometry (position grid, patch-kernel size, channels).
        ignored_keys: checkpoint keys the model has no place for (a 1000-class head, a plain ViT's pos_embed
            when loading a group-channel ViT ...).
        extra: checkpoint tensors outside the encoder, original names (MAE decoder, ``mask_token``), for the
            SSL objectives.
        notes: one line per conversion decision (RGB kernel mapping, cls/pos folding ...).
        meta: what the weights expect, when known: ``bands``, ``normalization`` (``mean``/``std``),
            ``input_size``, the sidecar of an explora-geo backbone file.
        random: ``True`` when no weights were loaded at all.
    """

    source: str
    loaded_keys: list[str] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    resampled_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    random: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``extra`` as ``{name: shape}``) for run summaries."""
        return {
            "source": self.source, "random": self.random, "loaded_keys": list(self.loaded_keys),
            "new_keys": list(self.new_keys), "resampled_keys": list(self.resampled_keys),
            "ignored_keys": list(self.ignored_keys), "extra": {k: list(v.shape) for k, v in self.extra.items()},
            "notes": list(self.notes), "meta": _jsonable(self.meta),
        }

    def summary(self) -> str:
        """One short paragraph for logs and the CLI."""
        if self.random:
            return (f"RANDOM INITIALISATION: no source weights were loaded (spec {self.source!r}); "
                    "results will not reflect a pre-trained model.")
        parts = [f"Loaded {len(self.loaded_keys)} tensors from {self.source}"]
        if self.resampled_keys:
            parts.append(f"resampled {', '.join(self.resampled_keys)}")
        if self.new_keys:
            parts.append(f"newly initialised {_abbrev(self.new_keys)}")
        if self.ignored_keys:
            parts.append(f"ignored {_abbrev(self.ignored_keys)}")
        if self.extra:
            kept = _abbrev(list(self.extra))
            parts.append(f"kept {len(self.extra)} non-encoder tensors for the objective ({kept})")
        text = "; ".join(parts) + "."
        if self.notes:
            text += " " + " ".join(n.rstrip(".") + "." for n in self.notes)
        return text


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything JSON cannot hold as its ``str``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _abbrev(keys: Sequence[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


@dataclass
class SourceCheckpoint:
    """A checkpoint as read: the raw object (a state dict or a container), where it came from, what it expects.

    ``bands`` are the source's input band names when known (torchgeo metadata, a backbone sidecar).
    """

    raw: Any
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    bands: list[str] | None = None


# --------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------

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
        raise ExploraGeoError(f"weights file {path} does not exist; {_WEIGHTS_HINT}.")
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


def _timm_checkpoint(name: str) -> SourceCheckpoint:
    """A timm pretrained name, through its pretrained cfg: the HF hub cache first, then torch.hub's."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ExploraGeoError(f"timm has no pretrained weights called {name!r}; {_WEIGHTS_HINT}.")
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
        reachable = not _offline() and _reachable(constants.ENDPOINT)
        if not reachable:
            failures.append(f"{constants.ENDPOINT} not reachable")
        for filename in names if reachable else ():
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
        if not _offline() and _reachable(cfg.url):
            try:
                raw = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", progress=True,
                                                         weights_only=True)
                return SourceCheckpoint(raw, f"{name} ({cfg.url})", meta)
            except Exception as err:  # noqa: BLE001 - no network
                failures.append(type(err).__name__)
    raise ExploraGeoError(
        f"weights {name!r} are not in the local Hugging Face / torch.hub cache and cannot be downloaded "
        f"({', '.join(failures) or 'offline'}); {_WEIGHTS_HINT}."
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
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


def _torchgeo_checkpoint(name: str) -> SourceCheckpoint:
    """A torchgeo weight enum name, e.g. ``ViTSmall16_Weights.SENTINEL2_ALL_DINO``, through torch.hub's cache."""
    from torchgeo.models import get_weight

    try:
        weights = get_weight(name)
    except ValueError:
        raise ExploraGeoError(f"torchgeo has no weights called {name!r}; list them with "
                              "`torchgeo.models.list_models()` and their *_Weights enums.") from None
    meta: dict[str, Any] = {k: v for k, v in weights.meta.items() if isinstance(v, (str, int, float, list))}
    norm = _transform_normalization(weights.transforms)
    if norm is not None:
        meta["normalization"] = norm
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        if not cached.is_file() and (_offline() or not _reachable(weights.url)):
            raise ConnectionError(f"{weights.url} not reachable")
        raw = weights.get_state_dict(progress=True)  # torch.hub: reads the cached file, else downloads
    except Exception as err:  # noqa: BLE001 - offline / not cached / corrupt
        if cached.is_file():
            raise ExploraGeoError(f"cannot read torchgeo weights file {cached} ({type(err).__name__}); delete it "
                                  f"and download again, or {_WEIGHTS_HINT}.") from err
        raise ExploraGeoError(
            f"torchgeo weights {name} are not cached at {cached} and cannot be downloaded "
            f"({type(err).__name__}); put the file there, or {_WEIGHTS_HINT}."
        ) from err
    bands = [str(b) for b in meta["bands"]] if isinstance(meta.get("bands"), list) else None
    return SourceCheckpoint(raw, f"torchgeo {name}", meta, bands)


def _transform_normalization(transforms: Any) -> dict[str, list[float]] | None:
    """``mean``/``std`` of the first Normalize-like module in a torchgeo weights' transforms."""
    modules = transforms.modules() if isinstance(transforms, nn.Module) else ()
    for module in modules:
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if isinstance(mean, (torch.Tensor, list, tuple)) and isinstance(std, (torch.Tensor, list, tuple)):
            return {"mean": [float(v) for v in torch.as_tensor(mean).flatten()],
                    "std": [float(v) for v in torch.as_tensor(std).flatten()]}
    return None


def resolve_source(spec: str | os.PathLike[str]) -> SourceCheckpoint | None:
    """Find the checkpoint ``spec`` names (``None`` for ``"random"``).

    Raises:
        ExploraGeoError: unknown name (with close timm names), missing/corrupt file, weights not obtainable.
    """
    text = str(spec)
    if text.strip().lower() == "random":
        return None
    path = Path(text).expanduser()
    if path.exists():
        return read_checkpoint_file(path)
    if "_Weights." in text:
        return _torchgeo_checkpoint(text)
    if os.sep in text or text.endswith(_FILE_SUFFIXES):
        raise ExploraGeoError(f"weights file {text} does not exist; {_WEIGHTS_HINT}.")
    import timm

    if timm.is_model(text.split(".")[0]) and timm.is_model_pretrained(text):
        return _timm_checkpoint(text)
    close = difflib.get_close_matches(text, timm.list_pretrained(), n=4, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ExploraGeoError(
        f"weights {text!r} are neither a file, a timm pretrained name nor a torchgeo weight name{hint}; "
        f"{_WEIGHTS_HINT}."
    )


# --------------------------------------------------------------------------------------------------------
# Converting to timm ViT keys
# --------------------------------------------------------------------------------------------------------

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
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and _ANCHOR not in obj:
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    prefixes = [k[: -len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)]
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


def split_extra(state_dict: StateDict) -> tuple[StateDict, StateDict, bool]:
    """Separate non-encoder tensors.

    MAE decoder keys (``decoder_*``) and ``mask_token`` go to ``extra`` (original names). A DINOv2 file
    (a ``mask_token`` and no decoder) is converted to timm keys with timm's DINOv2 converter (register
    tokens become ``reg_token``, with the cls position folded into ``cls_token``; SwiGLU ``w12``/``w3``
    become ``fc1``/``fc2``).

    Returns:
        ``(encoder_state_dict, extra, is_dinov2)``.
    """
    extra = {k: v for k, v in state_dict.items() if k.startswith("decoder_") or k == "mask_token"}
    is_dinov2 = "mask_token" in state_dict and not any(k.startswith("decoder_") for k in state_dict)
    encoder = {k: v for k, v in state_dict.items() if k not in extra}
    if is_dinov2:
        from timm.models.vision_transformer import _convert_dinov2  # timm's own DINOv2 key conversion

        encoder = _convert_dinov2({**encoder, "mask_token": extra["mask_token"]}, None)  # type: ignore[arg-type]
    return encoder, extra, is_dinov2


def match_layer_scale(state_dict: StateDict, model_has_layer_scale: bool) -> tuple[StateDict, str | None]:
    """Make a source's LayerScale match the model's, exactly (the network computes the same function).

    - source has ``blocks.i.ls1.gamma`` / ``ls2.gamma``, model has none: the gammas are folded into the
      preceding linear layers, ``attn.proj`` and ``mlp.fc2`` (``W <- diag(gamma) W``, ``b <- gamma * b``);
    - model has LayerScale, source has none: ``gamma = 1``.

    Returns:
        ``(state_dict, note)``; the note is ``None`` when nothing changed.
    """
    gammas = [k for k in state_dict if re.fullmatch(r"blocks\.\d+\.ls[12]\.gamma", k)]
    out = dict(state_dict)
    if gammas and not model_has_layer_scale:
        for key in gammas:
            block, which = key.rsplit(".", 2)[0], key.split(".")[-2]
            linear = f"{block}.attn.proj" if which == "ls1" else f"{block}.mlp.fc2"
            gamma = out.pop(key)
            out[f"{linear}.weight"] = gamma[:, None] * out[f"{linear}.weight"]
            if f"{linear}.bias" in out:
                out[f"{linear}.bias"] = gamma * out[f"{linear}.bias"]
        return out, "source LayerScale folded into attn.proj / mlp.fc2 (the model has no LayerScale; exact)"
    if not gammas and model_has_layer_scale:
        blocks = sorted({int(k.split(".")[1]) for k in out if re.match(r"blocks\.\d+\.norm1\.weight$", k)})
        for i in blocks:
            dim = out[f"blocks.{i}.norm1.weight"].shape[0]
            out[f"blocks.{i}.ls1.gamma"] = torch.ones(dim)
            out[f"blocks.{i}.ls2.gamma"] = torch.ones(dim)
        return out, "source has no LayerScale: the model's gammas are set to 1 (identity; exact)"
    return out, None


def _pos_prefix_tokens(state_dict: StateDict) -> int:
    """How many prefix (cls/register) entries the source ``pos_embed`` has: 0 or 1."""
    pos = state_dict.get("pos_embed")
    if pos is None or "reg_token" in state_dict:
        return 0
    n = pos.shape[1]
    return 0 if int(n**0.5) ** 2 == n else 1


# --------------------------------------------------------------------------------------------------------
# RGB / multi-band source -> group-channel patch embeddings
# --------------------------------------------------------------------------------------------------------

def band_kernels(
    weight: torch.Tensor,
    bands: Sequence[str],
    *,
    source_bands: Sequence[str],
    sensor: str | None,
    fresh: torch.Tensor,
    other_kernels: OtherKernels = "mean",
) -> tuple[torch.Tensor, str]:
    """Patch-embedding kernel for ``bands`` taken, by band name, from a source kernel.

    Args:
        weight: source kernel ``[D, C_src, p, p]`` (already at the model's patch size).
        bands: the target's input bands, e.g. one group ``["B02", "B03", "B04", "B08"]``.
        source_bands: names of the source's ``C_src`` channels, e.g. ``["B04", "B03", "B02"]`` for an RGB
            model (channel 0 = red), or the 13 names of a torchgeo Sentinel-2 model.
        sensor: preset whose aliases match band names (``None``: canonical ``B02``-style names only).
        fresh: the target's own initial kernel ``[D, len(bands), p, p]``, used by ``"random"``.
        other_kernels: for bands the source lacks: ``"mean"`` = the source kernel averaged over its channels,
            divided by ``len(bands)`` (so a group with no source band responds to a flat image with
            ``1 / C_src`` of the source stem's response per unit of input, spread evenly over its bands);
            ``"random"`` = keep ``fresh``.

    Returns:
        ``[D, len(bands), p, p]`` and a note ``"B02<-ch2 B08<-mean/4 ..."``.
    """
    mean_kernel = weight.mean(dim=1)
    chans, said = [], []
    for i, band in enumerate(bands):
        try:
            (src,) = select_bands(source_bands, [band], sensor=sensor)
        except ExploraGeoError:
            src = None
        if src is not None:
            chans.append(weight[:, src])
            said.append(f"{band}<-ch{src}")
        elif other_kernels == "mean":
            chans.append(mean_kernel / len(bands))
            said.append(f"{band}<-mean/{len(bands)}")
        else:
            chans.append(fresh[:, i])
            said.append(f"{band}<-random")
    return torch.stack(chans, dim=1), " ".join(said)


def rgb_to_group_kernels(
    weight: torch.Tensor,
    model: GroupChannelViT,
    *,
    source_bands: Sequence[str],
    sensor: str | None,
    other_kernels: OtherKernels = "mean",
) -> tuple[list[torch.Tensor], list[str]]:
    """Per-group patch-embedding kernels of ``model`` from a plain ViT's kernel (see :func:`band_kernels`).

    Returns:
        One ``[D, len(group), p, p]`` tensor per group, and a note per group saying what each band got.
    """
    kernels, notes = [], []
    for g, group in enumerate(model.band_groups):
        fresh = model.patch_embeds[g].proj.weight.detach()
        kernel, note = band_kernels(weight, group, source_bands=source_bands, sensor=sensor, fresh=fresh,
                                    other_kernels=other_kernels)
        kernels.append(kernel)
        notes.append(f"patch_embeds.{g}: {note}")
    return kernels, notes


def infer_sensor(bands: Sequence[str]) -> str | None:
    """The first sensor preset that knows every band name in ``bands`` (aliases allowed), else ``None``."""
    from explora_geo.sensors import SENSORS

    for name, sensor in SENSORS.items():
        if all(sensor.canonical(b) is not None for b in bands):
            return name
    return None


def _source_bands(found: SourceCheckpoint, n_channels: int, sensor: str | None,
                  rgb_bands: Sequence[str] | None) -> list[str] | None:
    """Names of the source's input channels: from its metadata, else the RGB bands for 3 channels."""
    if found.bands is not None and len(found.bands) == n_channels:
        return list(found.bands)
    if n_channels == 3:
        rgb = list(rgb_bands or get_sensor(sensor or "sentinel2").rgb or ())
        if len(rgb) != 3:
            raise ExploraGeoError(f"sensor {sensor} has no RGB bands; pass rgb_bands=[red, green, blue].")
        return rgb
    return None


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

def load_source_weights(
    model: nn.Module,
    spec: str | os.PathLike[str],
    *,
    img_size: int | tuple[int, int] | None = None,
    rgb_bands: Sequence[str] | None = None,
    other_kernels: OtherKernels = "mean",
) -> LoadReport:
    """Load source weights into ``model`` (a timm ``VisionTransformer`` or a :class:`GroupChannelViT`).

    Args:
        model: the backbone, changed in place.
        spec: ``"random"``, a file path, a timm pretrained name or a torchgeo weight name (module doc).
        img_size: if given, the model's input size is set to it first (``set_input_size``), so the position
            grid is resampled to that size.
        rgb_bands: names of the source's red, green, blue bands in the model's naming, for RGB sources into a
            group-channel ViT; default: the model's sensor preset ``rgb`` (Sentinel-2: B04, B03, B02).
        other_kernels: group-channel kernels of bands the source lacks: ``"mean"`` or ``"random"``
            (:func:`rgb_to_group_kernels`).

    Returns:
        A :class:`LoadReport`.

    Raises:
        ExploraGeoError: unobtainable/corrupt weights, or a checkpoint of another architecture (a missing or
            mis-shaped block, norm, token or embedding key, named with both shapes).
    """
    if img_size is not None and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=img_size)
    found = resolve_source(spec)
    if found is None:
        return LoadReport(source="random", random=True,
                          new_keys=list(model.state_dict()), notes=["no source weights: random initialisation"])
    state_dict, ignored = unwrap_state_dict(found.raw)
    if _ANCHOR not in state_dict:
        raise ExploraGeoError(f"{found.source} has no ViT blocks (no key ending in {_ANCHOR}); "
                              f"it is not a ViT checkpoint: {_WEIGHTS_HINT}.")
    encoder, extra, is_dinov2 = split_extra(state_dict)
    report = LoadReport(source=found.source, ignored_keys=ignored, extra=extra, meta=dict(found.meta))
    if is_dinov2:
        report.notes.append("DINOv2 checkpoint: mask_token kept in extra")
    has_ls = any(re.fullmatch(r"blocks\.\d+\.ls1\.gamma", k) for k in model.state_dict())
    encoder, note = match_layer_scale(encoder, has_ls)
    if note:
        report.notes.append(note)
    if isinstance(model, GroupChannelViT):
        target, allowed_new = _for_group_channel(encoder, model, found, report, rgb_bands, other_kernels)
    else:
        target, allowed_new = _for_timm_vit(encoder, model, found, report, rgb_bands, other_kernels)
    _load_strict(model, target, allowed_new, report)
    return report


def _record_resampled(before: StateDict, after: StateDict, report: LoadReport) -> None:
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if key in before and key in after and before[key].shape != after[key].shape:
            report.resampled_keys.append(f"{key} {tuple(before[key].shape)}->{tuple(after[key].shape)}")


def _for_timm_vit(
    encoder: StateDict,
    model: nn.Module,
    found: SourceCheckpoint,
    report: LoadReport,
    rgb_bands: Sequence[str] | None,
    other_kernels: OtherKernels,
) -> tuple[StateDict, frozenset[str]]:
    """Resample with timm's own ViT checkpoint filter; map input channels by band name when they differ."""
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    target = checkpoint_filter_fn(dict(encoder), model)
    _record_resampled(encoder, target, report)
    key = "patch_embed.proj.weight"
    have = model.state_dict().get(key)
    bands = getattr(model, "band_names", None)
    if key not in target or have is None:
        return target, _HEADS
    weight = target[key]
    sensor = getattr(model, "sensor", None) or (infer_sensor(bands) if bands else None)
    nameable = bands and (found.bands is not None or sensor is not None or rgb_bands is not None)
    source_bands = _source_bands(found, weight.shape[1], sensor, rgb_bands) if nameable else None
    if (source_bands is not None and list(source_bands) == list(bands or ())) or (
            source_bands is None and weight.shape[1] == have.shape[1]):
        return target, _HEADS
    if bands and source_bands:
        target[key], note = band_kernels(weight, bands, source_bands=source_bands, sensor=sensor,
                                         fresh=have, other_kernels=other_kernels)
        report.notes.append(f"patch_embed: {note}")
        report.resampled_keys.append(f"{key} channels {weight.shape[1]}->{have.shape[1]} (by band name)")
    else:
        target[key] = adapt_input_conv(have.shape[1], weight, base_chans=weight.shape[1])
        report.resampled_keys.append(f"{key} channels {weight.shape[1]}->{have.shape[1]} (timm adapt_input_conv)")
    return target, _HEADS


def _for_group_channel(
    encoder: StateDict,
    model: GroupChannelViT,
    found: SourceCheckpoint,
    report: LoadReport,
    rgb_bands: Sequence[str] | None,
    other_kernels: OtherKernels,
) -> tuple[StateDict, frozenset[str]]:
    """Map a plain-ViT (or group-channel) encoder onto a group-channel ViT."""
    heads = _HEADS
    if any(k.startswith("patch_embeds.") for k in encoder):  # our own group-channel checkpoint
        target = group_channel_filter(dict(encoder), model)
        if "pos_embed" in encoder and encoder["pos_embed"].shape != target["pos_embed"].shape:
            report.resampled_keys.append(
                f"pos_embed {tuple(encoder['pos_embed'].shape)}->{tuple(target['pos_embed'].shape)}")
        if found.bands and found.bands != model.band_names:
            raise ExploraGeoError(
                f"{found.source} was trained on bands {', '.join(found.bands)}, the model has "
                f"{', '.join(model.band_names)}; build the model with the checkpoint's bands."
            )
        return target, heads

    from timm.layers import resample_patch_embed

    unsupported = sorted(k for k in encoder if k.startswith(("norm_pre.", "attn_pool.")))
    if unsupported:
        raise ExploraGeoError(f"{found.source} has {unsupported[0]} (a pre-norm / attention-pool ViT) that a "
                              "group-channel ViT lacks; use a DINOv2 / MAE / plain ViT source.")
    target = {k: v for k, v in encoder.items() if k.startswith(("blocks.", "norm.", "head.", "fc_norm."))}
    cls = encoder.get("cls_token")
    if cls is not None:
        if _pos_prefix_tokens(encoder) == 1:
            cls = cls + encoder["pos_embed"][:, :1]
            report.notes.append("cls_token includes the source's cls position embedding "
                                "(no position encoding for prefix tokens)")
        target["cls_token"] = cls
    if "reg_token" in encoder:
        if model.reg_token is not None:
            target["reg_token"] = encoder["reg_token"]
        else:
            report.ignored_keys.append("reg_token")
            report.notes.append("source register tokens ignored: build the model with reg_tokens=N to keep them")
    if "pos_embed" in encoder:
        report.ignored_keys.append("pos_embed")
        report.notes.append("position/group encodings stay the group-channel sin-cos ones")
    weight, bias = encoder.get("patch_embed.proj.weight"), encoder.get("patch_embed.proj.bias")
    if weight is None:
        raise ExploraGeoError(f"{found.source} has no patch_embed.proj.weight; checkpoint of another "
                              f"architecture? {_WEIGHTS_HINT}.")
    if tuple(weight.shape[-2:]) != model.patch_size:
        resampled = resample_patch_embed(weight, list(model.patch_size))
        report.resampled_keys.append(
            f"patch_embed.proj.weight {tuple(weight.shape)}->{tuple(resampled.shape)} (timm resample_patch_embed)")
        weight = resampled
    sensor = model.sensor or infer_sensor(model.band_names) or "sentinel2"
    source_bands = _source_bands(found, weight.shape[1], sensor, rgb_bands)
    if source_bands is None:
        raise ExploraGeoError(
            f"{found.source} has a {weight.shape[1]}-channel patch embedding with unknown band names; "
            "use an RGB source or a checkpoint whose bands are known."
        )
    kernels, notes = rgb_to_group_kernels(weight, model, source_bands=source_bands, sensor=sensor,
                                          other_kernels=other_kernels)
    report.notes.extend(notes)
    report.ignored_keys.extend(k for k in ("patch_embed.proj.weight", "patch_embed.proj.bias") if k in encoder)
    for g, kernel in enumerate(kernels):
        target[f"patch_embeds.{g}.proj.weight"] = kernel
        if bias is not None:
            target[f"patch_embeds.{g}.proj.bias"] = bias
    report.ignored_keys.extend(k for k in encoder if k not in target and k not in report.ignored_keys
                               and not k.startswith(("cls_token", "reg_token")))
    allowed = heads | {"pos_embed", "group_embed"}
    allowed |= {k for k in model.state_dict() if k.startswith("patch_embeds.")}
    return target, allowed


def _load_strict(model: nn.Module, target: StateDict, allowed_new: frozenset[str], report: LoadReport) -> None:
    """Check every model key against ``target`` and load; raise for architecture mismatches."""
    own = model.state_dict()
    usable: StateDict = {}
    for key, value in target.items():
        if key not in own:
            if key.startswith("norm.") and "fc_norm.weight" in own:
                report.notes.append("source final norm ignored: the model pools with fc_norm (global_pool='avg')")
            elif _STRICT.match(key) and key not in report.ignored_keys:
                raise ExploraGeoError(
                    f"checkpoint {report.source}: key {key} {tuple(value.shape)} has no place in the model; "
                    "checkpoint of another "
                    f"architecture (deeper / with registers)? Build the matching model or {_WEIGHTS_HINT}."
                )
            if key not in report.ignored_keys:
                report.ignored_keys.append(key)
            continue
        if value.shape != own[key].shape:
            if key in allowed_new and key.startswith(("head.", "fc_norm.")):
                report.ignored_keys.append(key)  # e.g. a 1000-class head for a 10-class model
                continue
            raise ExploraGeoError(
                f"checkpoint {report.source}: key {key} has shape {tuple(value.shape)} but the model needs "
                f"{tuple(own[key].shape)}; checkpoint of another architecture? Build the matching model or "
                f"{_WEIGHTS_HINT}."
            )
        usable[key] = value
    for key in own:
        if key in usable:
            continue
        if key not in allowed_new:
            raise ExploraGeoError(
                f"checkpoint {report.source} lacks {key} (model shape {tuple(own[key].shape)}); "
                f"checkpoint of another architecture? Build the matching model or {_WEIGHTS_HINT}."
            )
        report.new_keys.append(key)
    result = model.load_state_dict(usable, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded_keys = sorted(usable)

"""Loading source weights into a backbone: resolve the spec, convert to timm ViT keys, map a plain ViT onto a
group-channel ViT, and load strictly.

Loading is strict about the transformer: a missing or mis-shaped block / norm / cls key is an
:class:`~explora_geo.errors.ExploraGeoError`. Only legitimately new parts may be initialised (the head;
for a group-channel ViT loaded from a plain ViT: the group patch embeddings' non-RGB kernels, the
position and group encodings), and the :class:`~explora_geo.models.weights.report.LoadReport` lists every key.
Some differences are converted rather than refused: LayerScale is folded into the preceding linear layers or
set to 1 (exact), position grids and patch kernels are resampled with timm's functions, and input channels are
mapped by band name.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.models.group_channel_vit import GroupChannelViT
from explora_geo.models.group_channel_vit import checkpoint_filter_fn as group_channel_filter
from explora_geo.models.weights.dinov2_files import convert_official_dinov2, is_official_dinov2, match_layer_scale
from explora_geo.models.weights.local_files import ANCHOR, FILE_SUFFIXES, read_checkpoint_file, unwrap_state_dict
from explora_geo.models.weights.mae_files import split_mae_decoder
from explora_geo.models.weights.report import WEIGHTS_HINT, LoadReport, SourceCheckpoint, StateDict
from explora_geo.models.weights.rgb_to_group import (
    OtherKernels,
    band_kernels,
    channel_band_names,
    infer_sensor,
    rgb_to_group_kernels,
)
from explora_geo.models.weights.timm_hub import timm_checkpoint
from explora_geo.models.weights.torchgeo_weights import torchgeo_checkpoint

__all__ = ["load_source_weights", "resolve_source", "split_extra"]

_HEADS = frozenset({"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"})
# Keys a ViT of another architecture would not share; a mismatch there is an error, never a silent re-init.
_STRICT = re.compile(r"^(blocks\.|norm\.|cls_token$|reg_token$|patch_embed\.|pos_embed$)")


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
        return torchgeo_checkpoint(text)
    if os.sep in text or text.endswith(FILE_SUFFIXES):
        raise ExploraGeoError(f"weights file {text} does not exist; {WEIGHTS_HINT}.")
    import timm

    if timm.is_model(text.split(".")[0]) and timm.is_model_pretrained(text):
        return timm_checkpoint(text)
    close = difflib.get_close_matches(text, timm.list_pretrained(), n=4, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ExploraGeoError(
        f"weights {text!r} are neither a file, a timm pretrained name nor a torchgeo weight name{hint}; "
        f"{WEIGHTS_HINT}."
    )


def split_extra(state_dict: StateDict) -> tuple[StateDict, StateDict, bool]:
    """Separate non-encoder tensors.

    MAE decoder keys (``decoder_*``) and ``mask_token`` go to ``extra`` (original names). A DINOv2 file
    (a ``mask_token`` and no decoder) is converted to timm keys with timm's DINOv2 converter
    (:func:`~explora_geo.models.weights.dinov2_files.convert_official_dinov2`); its ``mask_token`` also goes
    to ``extra``, for the iBOT loss.

    Returns:
        ``(encoder_state_dict, extra, is_dinov2)``.
    """
    if is_official_dinov2(state_dict):
        token = state_dict["mask_token"]
        encoder = convert_official_dinov2({k: v for k, v in state_dict.items() if k != "mask_token"}, token)
        return encoder, {"mask_token": token}, True
    encoder, decoder = split_mae_decoder(state_dict)
    if "mask_token" in encoder:  # a stray mask token without a decoder or DINOv2 layout: not an encoder key
        decoder["mask_token"] = encoder.pop("mask_token")
    return encoder, decoder, False


def _pos_prefix_tokens(state_dict: StateDict) -> int:
    """How many prefix (cls/register) entries the source ``pos_embed`` has: 0 or 1."""
    pos = state_dict.get("pos_embed")
    if pos is None or "reg_token" in state_dict:
        return 0
    n = pos.shape[1]
    return 0 if int(n**0.5) ** 2 == n else 1


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
    if ANCHOR not in state_dict:
        raise ExploraGeoError(f"{found.source} has no ViT blocks (no key ending in {ANCHOR}); "
                              f"it is not a ViT checkpoint: {WEIGHTS_HINT}.")
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
    source_bands = channel_band_names(found, weight.shape[1], sensor, rgb_bands) if nameable else None
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
                              f"architecture? {WEIGHTS_HINT}.")
    if tuple(weight.shape[-2:]) != model.patch_size:
        resampled = resample_patch_embed(weight, list(model.patch_size))
        report.resampled_keys.append(
            f"patch_embed.proj.weight {tuple(weight.shape)}->{tuple(resampled.shape)} (timm resample_patch_embed)")
        weight = resampled
    sensor = model.sensor or infer_sensor(model.band_names) or "sentinel2"
    source_bands = channel_band_names(found, weight.shape[1], sensor, rgb_bands)
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
                    f"architecture (deeper / with registers)? Build the matching model or {WEIGHTS_HINT}."
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
                f"{WEIGHTS_HINT}."
            )
        usable[key] = value
    for key in own:
        if key in usable:
            continue
        if key not in allowed_new:
            raise ExploraGeoError(
                f"checkpoint {report.source} lacks {key} (model shape {tuple(own[key].shape)}); "
                f"checkpoint of another architecture? Build the matching model or {WEIGHTS_HINT}."
            )
        report.new_keys.append(key)
    result = model.load_state_dict(usable, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded_keys = sorted(usable)

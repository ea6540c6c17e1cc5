"""Official DINOv2 checkpoints (``dinov2_vitl14_pretrain.pth`` ...): ``mask_token``, ``register_tokens``,
LayerScale, a 37 x 37 position grid for 518 px. Key conversion is timm's own; LayerScale is matched exactly."""

from __future__ import annotations

import re

import torch

from explora_geo.models.weights.report import StateDict

__all__ = ["convert_official_dinov2", "is_official_dinov2", "match_layer_scale"]


def is_official_dinov2(state_dict: StateDict) -> bool:
    """An official DINOv2 file: it has the iBOT ``mask_token`` and no MAE decoder."""
    return "mask_token" in state_dict and not any(k.startswith("decoder_") for k in state_dict)


def convert_official_dinov2(encoder: StateDict, mask_token: torch.Tensor) -> StateDict:
    """timm keys for an official DINOv2 encoder, by timm's own DINOv2 converter: register tokens become
    ``reg_token`` (the cls position folded into ``cls_token``), SwiGLU ``w12``/``w3`` become ``fc1``/``fc2``.
    The ``mask_token`` is dropped here (timm's ViT has none); the iBOT objective takes it from the report."""
    from timm.models.vision_transformer import _convert_dinov2  # timm's own DINOv2 key conversion

    return _convert_dinov2({**encoder, "mask_token": mask_token}, None)  # type: ignore[arg-type]


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



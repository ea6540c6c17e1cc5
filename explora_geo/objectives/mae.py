"""Masked autoencoding (MAE, He et al. 2022; SatMAE group-channel variant, Cong et al. 2022).

The encoder sees only the visible tokens; a light decoder rebuilds every masked patch. For the group-channel
ViT each channel group has its own prediction layer and predicts ITS OWN bands, in the group's order; targets
are taken from the input by band name (:func:`group_targets`), never by slicing the input in some other
band order (the SatMAE public code compares group-ordered predictions with band-ordered targets when the
groups are not contiguous in the sensor's order).

The decoder uses the official MAE parameter names once the ``decoder_`` prefix is removed (``embed``,
``mask_token``, ``blocks.{i}``, ``norm``, ``pred.{g}``), so a released "visualize"/full MAE checkpoint's
decoder loads into it (:meth:`MAEDecoder.load_official`), which returns a :class:`DecoderReport` naming every
decoder tensor as loaded, new or mismatched. In ExPLoRA-MAE a loaded decoder block is frozen and gets LoRA on
Q and V (rank ``decoder_lora_rank``) with trainable norms; a block that was not loaded completely, and a new
decoder, train fully (never LoRA on random weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from explora_geo.models.pos_embed import sincos_1d, sincos_2d
from explora_geo.objectives.base import Objective, group_channel_indices
from explora_geo.objectives.masking import (
    dropped_tokens,
    keep_indices,
    patch_size_of,
    random_token_mask,
    token_grid,
)

__all__ = ["MAEConfig", "MAEDecoder", "MAEObjective", "DecoderReport", "patchify", "group_targets",
           "reconstruction_loss"]

#: Said when the source checkpoint has no decoder (encoder-only MAE weights).
NO_DECODER = ("the source weights have no MAE decoder (encoder-only weights such as timm's "
              "vit_large_patch16_224.mae or MAE's mae_pretrain_vit_*.pth): a new decoder is built and trains fully")


@dataclass
class MAEConfig:
    """MAE settings (defaults: the MAE paper / ExPLoRA-MAE recipe).

    Args:
        mask_ratio: fraction of patch tokens hidden from the encoder.
        mask_mode: ``"independent"`` (tokens drawn over all groups x positions; SatMAE's better default) or
            ``"consistent"`` (the same positions hidden in every group). Same thing for a one-group ViT.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, std 1 over the patch). On by default: MAE's
            released weights were trained with it and ExPLoRA continues the same objective.
        decoder_dim, decoder_depth, decoder_heads: decoder width, blocks, heads (512 x 8 x 16 in MAE).
        decoder_group_dim: width of the decoder's group code (group-channel ViT only); default ``dim // 4``.
        decoder_lora_rank: LoRA rank on the Q and V of a LOADED decoder (its other weights frozen, norms
            trained); 0 trains the loaded decoder fully. A new decoder always trains fully.
    """

    mask_ratio: float = 0.75
    mask_mode: Literal["independent", "consistent"] = "independent"
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_group_dim: int | None = None
    decoder_lora_rank: int = 8

    def __post_init__(self) -> None:
        from explora_geo.errors import ExploraGeoError

        if not 0.0 < self.mask_ratio < 1.0:
            raise ExploraGeoError(f"MAE mask_ratio must be in (0, 1), got {self.mask_ratio}.")
        if self.mask_mode not in ("independent", "consistent"):
            raise ExploraGeoError(f"MAE mask_mode {self.mask_mode!r} is unknown; use independent or consistent.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, h*w, p*p*C]``, each patch flattened as (row, column, channel) like MAE."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def group_targets(images: Tensor, channels: list[list[int]], patch_size: int) -> list[Tensor]:
    """Reconstruction targets: for group g, the patches of ITS channels ``images[:, channels[g]]``.

    Args:
        images: ``[B, C, H, W]`` normalised input.
        channels: per group, input-channel indices in the group's band order
            (:func:`explora_geo.objectives.base.group_channel_indices`).
        patch_size: pixels.

    Returns:
        per group ``[B, L, p*p*C_g]``.
    """
    return [patchify(images[:, idx], patch_size) for idx in channels]


def reconstruction_loss(
    preds: list[Tensor], targets: list[Tensor], mask: Tensor, valid: Tensor | None = None, norm_pix: bool = False,
) -> Tensor:
    """Mean squared error over the masked patches of every group.

    Args:
        preds, targets: per group ``[B, L, p*p*C_g]`` (same layout as :func:`patchify`).
        mask: ``[B, G, L]`` bool, True where the token was hidden (only those count).
        valid: ``[B, L, p*p]`` pixel validity (1 = data, 0 = nodata); ``None`` = all valid. Invalid pixels
            are left out of the error and of the norm-pix statistics; patches with no valid pixel do not count.
        norm_pix: normalise each target patch by its own mean and (unbiased) standard deviation.

    Returns:
        scalar: the per-token mean error averaged over the counted tokens.
    """
    total = preds[0].new_zeros(())
    count = preds[0].new_zeros(())
    for g, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        b, n, d = target.shape
        if valid is None:
            w = torch.ones_like(target)
        else:
            pp = valid.shape[-1]
            w = valid.to(target.dtype).unsqueeze(-1).expand(b, n, pp, d // pp).reshape(b, n, d)
        n_valid = w.sum(-1)
        if norm_pix:
            mean = (w * target).sum(-1, keepdim=True) / n_valid.clamp(min=1).unsqueeze(-1)
            var = (w * (target - mean) ** 2).sum(-1, keepdim=True) / (n_valid - 1).clamp(min=1).unsqueeze(-1)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        err = ((pred.float() - target.float()) ** 2 * w).sum(-1) / n_valid.clamp(min=1)
        counted = (mask[:, g] & (n_valid > 0)).to(err.dtype)
        total = total + (err * counted).sum()
        count = count + counted.sum()
    return total / count.clamp(min=1)


@dataclass
class DecoderReport:
    """What happened to every tensor of the MAE decoder when the source checkpoint was read.

    Attributes:
        source_has_decoder: the source checkpoint had decoder tensors at all.
        status: every decoder tensor (our names, e.g. ``blocks.0.attn.qkv.weight``) -> ``"loaded"``,
            ``"new"`` (not in the source) or ``"mismatched: source (a, b) vs decoder (c, d)"`` (left new).
        ignored: source decoder keys with no place here (``decoder_pos_embed``: the codes are fixed sin-cos,
            rebuilt for the model's grid).
        notes: plain-language lines (no decoder in the source; which blocks train fully).
    """

    source_has_decoder: bool
    status: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def keys(self, state: str) -> list[str]:
        """Tensor names whose status starts with ``state`` (``"loaded"``, ``"new"``, ``"mismatched"``)."""
        return [k for k, v in self.status.items() if v.startswith(state)]

    def blocks_not_loaded(self) -> list[int]:
        """Indices of decoder blocks with at least one tensor that did not come from the source."""
        return sorted({int(m.group(1)) for k, v in self.status.items()
                       if (m := re.match(r"blocks\.(\d+)\.", k)) and v != "loaded"})

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict for summary.json."""
        return {"source_has_decoder": self.source_has_decoder, "loaded": self.keys("loaded"),
                "new": self.keys("new"), "mismatched": {k: v for k, v in self.status.items()
                                                        if v.startswith("mismatched")},
                "ignored": list(self.ignored), "notes": list(self.notes)}

    def summary(self) -> str:
        """One line for the log."""
        if not self.source_has_decoder:
            return f"MAE decoder: {NO_DECODER}."
        text = (f"MAE decoder: {len(self.keys('loaded'))} tensors loaded, {len(self.keys('new'))} new, "
                f"{len(self.keys('mismatched'))} mismatched")
        mismatched = self.keys("mismatched")
        if mismatched:
            text += f" ({', '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''})"
        return text + "." + "".join(f" {n.rstrip('.')}." for n in self.notes)


class MAEDecoder(nn.Module):
    """MAE decoder for a one-group ViT or a group-channel ViT.

    Args:
        embed_dim: encoder width D.
        dim, depth, heads: decoder width Dd, blocks, heads.
        patch_size: pixels.
        group_channels: number of channels of each group (one entry for a plain ViT).
        group_dim: width Dg of the decoder's 1-D group code (multi-group only); the 2-D position code then
            has width ``Dd - Dg``. Codes are fixed sin-cos (not trained), as in MAE and SatMAE.
    """

    def __init__(self, embed_dim: int, dim: int, depth: int, heads: int, patch_size: int,
                 group_channels: list[int], group_dim: int | None = None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_groups = len(group_channels)
        self.group_dim = 0 if self.num_groups == 1 else (group_dim or max(4, (dim // 4) // 4 * 4))
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=_layer_norm) for _ in range(depth)
        )
        self.norm = _layer_norm(dim)
        self.pred = nn.ModuleList(nn.Linear(dim, patch_size**2 * c) for c in group_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def codes(self, h: int, w: int) -> Tensor:
        """Fixed position (+ group) codes ``[G*h*w, Dd]`` of the patch tokens, group-major."""
        dim = self.embed.out_features
        pos = sincos_2d(dim - self.group_dim, (h, w))
        if self.num_groups == 1:
            return pos
        grp = sincos_1d(self.group_dim, torch.arange(self.num_groups))
        return torch.cat([pos.repeat(self.num_groups, 1), grp.repeat_interleave(h * w, dim=0)], dim=1)

    def forward(self, latent: Tensor, keep: Tensor, h: int, w: int, prefix: int) -> list[Tensor]:
        """Predict every patch of every group.

        Args:
            latent: encoder output ``[B, P + K, D]`` (P prefix tokens, K visible patch tokens).
            keep: ``[B, K]`` indices of the visible tokens among the ``G*h*w`` patch tokens.
            h, w: patch grid.
            prefix: P.

        Returns:
            per group ``[B, h*w, p*p*C_g]``.
        """
        x = self.embed(latent)
        b, dim = x.shape[0], x.shape[-1]
        n = self.num_groups * h * w
        full = self.mask_token.to(x.dtype).expand(b, n, dim).scatter(
            1, keep.unsqueeze(-1).expand(-1, -1, dim), x[:, prefix:]
        )
        full = full + self.codes(h, w).to(x)
        x = torch.cat([x[:, :prefix], full], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, prefix:].reshape(b, self.num_groups, h * w, dim)
        return [head(x[:, g]) for g, head in enumerate(self.pred)]

    def load_official(self, tensors: Mapping[str, Tensor]) -> DecoderReport:
        """Load an official MAE checkpoint's decoder (``decoder_embed.*``, ``mask_token``, ``decoder_blocks.*``,
        ``decoder_norm.*``, ``decoder_pred.*``; ``decoder_pos_embed`` is fixed and rebuilt, not loaded).

        Tensors whose shape does not fit (e.g. an RGB ``decoder_pred`` for a group of 4 bands) stay new and
        are reported as mismatched, with both shapes.

        Returns:
            a :class:`DecoderReport` with a status for every decoder tensor.
        """
        own = self.state_dict()
        report = DecoderReport(source_has_decoder=any(k.startswith("decoder_") for k in tensors))
        if not report.source_has_decoder:
            report.notes.append(NO_DECODER)
        loaded: dict[str, Tensor] = {}
        for key, value in tensors.items():
            name = _official_to_ours(key)
            if name is None or name not in own:
                report.ignored.append(key)
            elif own[name].shape != value.shape:
                report.status[name] = (f"mismatched: source {tuple(value.shape)} vs decoder "
                                       f"{tuple(own[name].shape)}")
            else:
                loaded[name] = value
                report.status[name] = "loaded"
        for name in own:
            report.status.setdefault(name, "new")
        report.status = dict(sorted(report.status.items()))
        result = self.load_state_dict(loaded, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        return report


def _layer_norm(dim: int, **kwargs: Any) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1.0e-6, **kwargs)


def _official_to_ours(key: str) -> str | None:
    key = key.removeprefix("module.").removeprefix("model.")
    if key == "mask_token":
        return key
    for old, new in (("decoder_embed.", "embed."), ("decoder_blocks.", "blocks."), ("decoder_norm.", "norm."),
                     ("decoder_pred.", "pred.0.")):
        if key.startswith(old):
            return new + key[len(old):]
    return None


class MAEObjective(Objective):
    """MAE on a timm ViT or a group-channel ViT.

    Args:
        backbone: the (ExPLoRA-adapted) encoder; input channels ordered as its ``band_names``.
        in_chans: number of input channels.
        config: :class:`MAEConfig`.
        decoder_state: an MAE checkpoint's decoder tensors (official names), e.g. ``LoadReport.extra``;
            ``None`` or empty builds a new decoder.

    Attributes:
        decoder_report: :class:`DecoderReport` of the decoder's tensors (also when there was no decoder).
    """

    name = "mae"
    betas = (0.9, 0.95)

    def __init__(self, backbone: nn.Module, in_chans: int, config: MAEConfig | None = None,
                 decoder_state: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(backbone)
        self.config = config or MAEConfig()
        self.channels = group_channel_indices(backbone, in_chans)
        self.decoder = MAEDecoder(
            int(backbone.embed_dim), self.config.decoder_dim, self.config.decoder_depth,
            self.config.decoder_heads, patch_size_of(backbone), [len(c) for c in self.channels],
            self.config.decoder_group_dim,
        )
        self.decoder_report = self.decoder.load_official(decoder_state or {})
        if self.decoder_loaded and self.config.decoder_lora_rank > 0:
            _adapt_decoder(self.decoder, self.config.decoder_lora_rank, self.decoder_report)

    @property
    def decoder_loaded(self) -> list[str]:
        """Decoder tensors (our names) that came from the source checkpoint."""
        return self.decoder_report.keys("loaded")

    def forward(self, batch: dict[str, Tensor], step: int = 0, max_steps: int = 1) -> dict[str, Tensor]:
        """MAE loss of a batch (see :meth:`Objective.forward`)."""
        images = batch["image"]
        b, _, height, width = images.shape
        groups, h, w = token_grid(self.backbone, height, width)
        mask = random_token_mask(b, groups, h * w, self.config.mask_ratio,
                                 consistent=self.config.mask_mode == "consistent", device=images.device)
        keep = keep_indices(mask)
        with dropped_tokens(self.backbone, keep):
            latent = self.backbone.forward_features(images)
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        preds = self.decoder(latent, keep, h, w, prefix)
        targets = group_targets(images, self.channels, self.decoder.patch_size)
        valid = batch.get("valid_mask")
        if valid is not None:
            valid = patchify(valid[:, None].to(images.dtype), self.decoder.patch_size)
        loss = reconstruction_loss(preds, targets, mask, valid, self.config.norm_pix_loss)
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}

    def report(self) -> dict[str, Any]:
        """``{"decoder": DecoderReport.to_dict(), "norm_pix_loss": bool}``."""
        return {"decoder": self.decoder_report.to_dict(), "norm_pix_loss": self.config.norm_pix_loss}

    def default_lr(self, batch_size: int) -> float:
        """MAE recipe: base lr 4.5e-4 per 256 images (ExPLoRA-MAE)."""
        return 4.5e-4 * batch_size / 256


def _adapt_decoder(decoder: MAEDecoder, rank: int, report: DecoderReport) -> None:
    """ExPLoRA-MAE on a loaded decoder: freeze the blocks that were loaded completely and add LoRA on their Q
    and V; a block with any tensor not loaded (new or mismatched) trains fully, never LoRA on random
    weights. Norms, embed, mask token and the prediction layers train."""
    from explora_geo.adapter import ExploraConfig, apply_explora

    unfrozen = tuple(report.blocks_not_loaded())
    if unfrozen:
        report.notes.append(f"decoder block(s) {', '.join(map(str, unfrozen))} not fully loaded: they train "
                            "fully (no LoRA on random weights)")
    apply_explora(decoder, ExploraConfig(unfreeze=unfrozen, rank=rank, train_norms=True, train_cls_token=False,
                                         train_embeddings=False))
    for module in (decoder.embed, decoder.norm, decoder.pred):
        for p in module.parameters():
            p.requires_grad_(True)
    decoder.mask_token.requires_grad_(True)

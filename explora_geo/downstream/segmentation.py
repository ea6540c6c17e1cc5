"""Semantic segmentation with the same (group-channel or plain) ViT backbones.

:class:`ViTSegmenter` puts a light decoder suited to ViTs on a backbone: the patch tokens of the last
``n_blocks`` blocks (final norm applied; for a group-channel ViT averaged over the channel groups), laid out
as ``[B, D, H/p, W/p]`` grids, concatenated, fused by a 1x1 conv, refined by a 3x3 conv, classified per patch
cell by a 1x1 conv, and upsampled bilinearly to the input size (multi-level fusion as in SETR-MLA / DPT
readouts, without their extra stages). :class:`ExploraSegmentationTask` is a
``torchgeo.tasks.SemanticSegmentation`` (its losses, metrics and steps) whose model is a ViTSegmenter, with
the same backbone files and fine-tuning modes as the classification task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchgeo.tasks import SemanticSegmentation

import explora_geo.models  # noqa: F401  (registers our timm models)
from explora_geo.downstream.tasks import LORA_TARGETS, ExploraTaskMixin, Mode, configure_finetuning, merge_lora
from explora_geo.errors import ExploraGeoError

__all__ = ["ExploraSegmentationTask", "ViTSegmenter", "is_segmentation_checkpoint", "segmenter_from_checkpoint"]


class ViTSegmenter(nn.Module):
    """Backbone + multi-level ViT decoder: images ``[B, C, H, W]`` -> logits ``[B, K, H, W]``.

    Args:
        backbone: a timm-style ViT with ``get_intermediate_layers(x, n, reshape=True, norm=True)``.
        num_classes: K.
        n_blocks: how many last blocks feed the decoder (capped by the depth).
        decoder_dim: channels of the decoder.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, n_blocks: int = 4,
                 decoder_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_blocks = min(n_blocks, len(backbone.blocks))
        dim = int(getattr(backbone, "embed_dim", None) or backbone.num_features)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.n_blocks * dim, decoder_dim, 1, bias=False),
            nn.BatchNorm2d(decoder_dim),
            nn.GELU(),
            nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_dim),
            nn.GELU(),
            nn.Conv2d(decoder_dim, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        grids = self.backbone.get_intermediate_layers(x, n=self.n_blocks, reshape=True, norm=True)
        return self.decode(grids, x.shape[-2:])

    def decode(self, grids: list[Tensor] | tuple[Tensor, ...], size: tuple[int, int] | torch.Size) -> Tensor:
        """Normed patch-token grids of the last ``n_blocks`` blocks (each ``[B, D, H/p, W/p]``) -> logits
        ``[B, K, *size]``."""
        logits = self.decoder(torch.cat(list(grids), dim=1))
        return nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class ExploraSegmentationTask(ExploraTaskMixin, SemanticSegmentation):
    """Semantic segmentation with an explora-geo backbone and :class:`ViTSegmenter`'s decoder.

    Args:
        model: a timm ViT name (ignored when ``weights`` is a backbone file or entry: its sidecar decides).
        weights: a backbone file, a ``backbone_weights`` entry, ``True`` (timm pretrained config of
            ``model``) or ``None`` (random).
        in_channels: ``None`` takes the backbone's number of bands (another number is an error).
        num_classes: classes of the masks (for mask folders: ``len(classes) + 1`` with ``ignore_index=0``).
        mode: ``full``, ``lora`` (peft LoRA-r8 on every block's ``qkv`` + decoder; see
            :func:`~explora_geo.downstream.tasks.configure_finetuning`) or ``linear_probe`` (frozen backbone,
            decoder only).
        lora_rank, lora_alpha, lora_targets: LoRA rank, scale numerator and peft ``target_modules``.
        n_blocks, decoder_dim: decoder inputs and width.
        backbone_meta: the backbone sidecar; filled in automatically.
        task, num_labels, labels, loss, class_weights, pos_weight, ignore_index, lr, patience: as in
            ``torchgeo.tasks.SemanticSegmentation``.
    """

    def __init__(
        self,
        model: str = "group_channel_vit_tiny_patch8_96",
        weights: Any = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        labels: list[str] | None = None,
        mode: Mode = "full",
        lora_rank: int = 8,
        lora_alpha: float = 1.0,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        n_blocks: int = 4,
        decoder_dim: int = 128,
        task: Literal["binary", "multiclass", "multilabel"] = "multiclass",
        num_labels: int | None = None,
        loss: Literal["ce", "bce", "jaccard", "focal", "dice"] = "ce",
        class_weights: list[float] | None = None,
        pos_weight: Tensor | None = None,
        ignore_index: int | None = None,
        lr: float = 1e-3,
        patience: int = 10,
        backbone_meta: dict[str, Any] | None = None,
    ) -> None:
        model, in_channels = self._resolve_backbone(model, weights, in_channels, num_classes, mode=mode, task=task,
                                                    backbone_meta=backbone_meta)
        super().__init__(model="fcn", backbone=model, weights=weights, in_channels=in_channels, task=task,
                         num_classes=num_classes, num_labels=num_labels, labels=labels, pos_weight=pos_weight,
                         loss=loss, class_weights=class_weights, ignore_index=ignore_index, lr=lr,
                         patience=patience)
        self.hparams.update(model=model, backbone=model, in_channels=in_channels, backbone_meta=self._backbone_meta)

    def configure_models(self) -> None:
        """Backbone (checked loading of backbone files) + decoder; trainable parameters per ``mode``."""
        import timm

        backbone = self._build_backbone(0, lambda: timm.create_model(
            self.hparams["backbone"], num_classes=0, in_chans=self.hparams["in_channels"],
            pretrained=self.weights is True))
        self.model = ViTSegmenter(backbone, self._num_outputs(), n_blocks=self.hparams["n_blocks"],
                                  decoder_dim=self.hparams["decoder_dim"])
        self.model.backbone = configure_finetuning(
            backbone, self.hparams["mode"], head=self.model.decoder, lora_rank=self.hparams["lora_rank"],
            lora_alpha=self.hparams["lora_alpha"], lora_targets=self.hparams["lora_targets"])

    def lora_backbone(self) -> nn.Module:
        """The backbone inside the segmenter (a ``peft.PeftModel`` in ``mode="lora"``)."""
        return self.model.backbone


_TASK_KWARGS = ("model", "num_classes", "labels", "mode", "lora_rank", "lora_alpha", "lora_targets", "n_blocks",
                "decoder_dim",
                "task", "num_labels", "loss", "ignore_index", "lr", "patience", "in_channels")


def is_segmentation_checkpoint(ckpt: dict[str, Any]) -> bool:
    """Whether a loaded Lightning checkpoint holds an :class:`ExploraSegmentationTask` (a ViTSegmenter's
    ``model.decoder`` and ``model.backbone`` weights)."""
    state = ckpt.get("state_dict") or {}
    return any(k.startswith("model.decoder.") for k in state) and any(k.startswith("model.backbone.") for k in state)


def segmenter_from_checkpoint(
    path: str | os.PathLike[str], ckpt: dict[str, Any] | None = None,
) -> tuple[ViTSegmenter, dict[str, Any], dict[str, Any]]:
    """The trained :class:`ViTSegmenter` of an :class:`ExploraSegmentationTask` checkpoint (``torchgeo fit``
    with ``configs/torchgeo_segmentation.yaml``, or ``trainer.save_checkpoint``), in eval mode, LoRA merged.

    Args:
        path: the ``.ckpt`` file.
        ckpt: the checkpoint already loaded (``torch.load(path, weights_only=True)``), to avoid reading it twice.

    Returns:
        ``(segmenter, backbone sidecar, task hyper-parameters)``.

    Raises:
        ExploraGeoError: a missing file, a checkpoint of another task, one without explora-geo backbone metadata,
            or a binary / multilabel task.
    """
    path = Path(path)
    if ckpt is None:
        if not path.is_file():
            raise ExploraGeoError(f"checkpoint {path} does not exist; pass the .ckpt that `torchgeo fit` wrote.")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not is_segmentation_checkpoint(ckpt):
        raise ExploraGeoError(f"{path} is not an ExploraSegmentationTask checkpoint (no model.decoder / "
                              "model.backbone weights); pass the .ckpt of `torchgeo fit --config "
                              "configs/torchgeo_segmentation.yaml`.")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    meta = hparams.get("backbone_meta")
    if not meta:
        raise ExploraGeoError(f"{path} has no explora-geo backbone metadata (it was not trained with "
                              "ExploraSegmentationTask and an explora-geo backbone file); train it with one.")
    if hparams.get("task", "multiclass") != "multiclass":
        raise ExploraGeoError(f"{path} is a {hparams['task']} segmentation task; only multiclass tasks (softmax over "
                              "classes) can be exported: train with task 'multiclass' and num_classes >= 2.")
    kwargs = {k: hparams[k] for k in _TASK_KWARGS if k in hparams}
    task = ExploraSegmentationTask(weights=None, backbone_meta=meta, **kwargs)
    task.load_state_dict(ckpt["state_dict"], strict=True)
    segmenter = task.model
    if task.hparams["mode"] == "lora":
        segmenter.backbone = merge_lora(segmenter.backbone)
    sidecar = {k: v for k, v in meta.items() if k != "weights_file"}
    return segmenter.eval(), sidecar, hparams

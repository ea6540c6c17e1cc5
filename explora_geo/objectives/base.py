"""What the training module needs from a self-supervised objective.

An :class:`Objective` wraps the backbone it trains (an ExPLoRA-adapted ViT), owns its own heads / decoder /
teacher and its loss, and states its optimiser preferences. The Lightning module
(:class:`explora_geo.training.task.ExploraPretrainTask`) owns the loop-independent rest: optimiser, schedules,
logging, checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Objective", "cosine", "group_channel_indices"]


def cosine(step: int, max_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``max_steps`` and after)."""
    if max_steps <= 0:
        return end
    t = min(max(step / max_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def group_channel_indices(backbone: nn.Module, in_chans: int) -> list[list[int]]:
    """For each channel group of ``backbone``, the input-channel indices of its bands, in the group's order.

    Input channels follow ``backbone.band_names`` (docs/architecture.md); a group's channels are found BY NAME
    there, so the result is right whatever the order of the groups. A model without ``band_groups`` (a timm
    ViT) has one group of all ``in_chans`` channels.
    """
    groups = getattr(backbone, "band_groups", None)
    names = getattr(backbone, "band_names", None)
    if not groups or names is None:
        return [list(range(in_chans))]
    from explora_geo.sensors import select_bands

    return [select_bands(list(names), list(group), source="the model's band_names") for group in groups]


class Objective(nn.Module):
    """Base class of the pre-training objectives.

    Attributes:
        name: ``"mae"`` or ``"dinov2"`` (goes into the backbone sidecar).
        backbone: the ViT being trained (student).
        betas: AdamW betas this objective is usually trained with.
    """

    name: str = ""
    betas: tuple[float, float] = (0.9, 0.999)

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict[str, Tensor], step: int, max_steps: int) -> dict[str, Tensor]:
        """Loss of one batch.

        Args:
            batch: ``{"image": [B, C, H, W] float (normalised), "valid_mask": [B, H, W] bool (optional)}``.
            step, max_steps: the optimiser step (for schedules such as the teacher temperature).

        Returns:
            ``{"loss": scalar, ...}``: the total loss plus named parts (detached) for logging.
        """
        raise NotImplementedError

    def default_lr(self, batch_size: int) -> float:
        """Learning rate for an effective batch of ``batch_size`` images (paper recipe)."""
        raise NotImplementedError

    def weight_decay(self, step: int, max_steps: int) -> float:
        """AdamW weight decay at ``step``."""
        return 0.0

    def student_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the optimiser updates (teacher copies excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def report(self) -> dict[str, Any]:
        """JSON-ready account of what the objective took from the source checkpoint and of its input
        geometry (MAE: the decoder's tensors; DINOv2: the mask token and the crop sizes), for summary.json."""
        return {}

    def set_max_steps(self, max_steps: int) -> None:
        """Fix the run length for step-count settings (called once by the training module)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and before clipping / the optimiser step (e.g. cancel some gradients)."""

    @torch.no_grad()
    def after_optimizer_step(self, step: int, max_steps: int) -> None:
        """Called after each optimiser step (e.g. the EMA teacher update)."""

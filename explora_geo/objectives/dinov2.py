"""DINOv2 self-distillation (Oquab et al. 2023): DINO cls loss + iBOT masked-patch loss + KoLeo.

A student (the ExPLoRA-adapted backbone + a projection head) is trained to match an EMA teacher on
multi-crop views. ExPLoRA specifics (method.md):

- the EMA teacher covers only what trains (LoRA, unfrozen blocks, norms, tokens, embeddings, head); the frozen
  weights are the SAME tensors in student and teacher (:func:`build_teacher`), never copied;
- the LoRA stays unmerged in both (the adapter never merges implicitly);
- teacher targets are centred by softmax centering (moving-average centre) or Sinkhorn-Knopp;
- schedules: teacher temperature (linear warm-up), EMA momentum (cosine to 1), weight decay (cosine);
- the head's last layer gets no update during the first ``freeze_last_layer_steps`` steps;
- the teacher always runs in eval mode (no dropout / drop-path in the targets), whatever ``.train()`` says;
- iBOT uses the DINO head by default or its own head (``separate_ibot_head``, DINOv2's ``ibot.separate_head``);
- the iBOT mask token starts from an official DINOv2 file's ``mask_token`` when the source has one
  (:attr:`DINOv2Objective.mask_token_source` says which).

Losses and heads come from lightly (:class:`~lightly.models.modules.heads.DINOv2ProjectionHead`,
:class:`~lightly.loss.KoLeoLoss`, :class:`~lightly.models.modules.center.Center`,
:func:`~lightly.models.utils.random_block_mask`); the cross-entropies are written here because lightly's
``DINOLoss`` / ``IBOTPatchLoss`` hard-wire softmax centering (no Sinkhorn-Knopp).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import KoLeoLoss
from lightly.models.modules.center import Center
from lightly.models.modules.heads import DINOv2ProjectionHead
from lightly.models.utils import random_block_mask
from torch import Tensor, nn

from explora_geo.augment import MultiCrop, MultiCropConfig
from explora_geo.errors import ExploraGeoError
from explora_geo.objectives.base import Objective, cosine
from explora_geo.objectives.masking import img_size_of, patch_size_of, replaced_tokens, token_grid

__all__ = ["DINOv2Config", "DINOv2Objective", "projection_head", "build_teacher", "ema_pairs", "ema_update",
           "sinkhorn_knopp", "update_center", "is_rgb_input",
           "cross_view_loss", "masked_patch_loss"]


@dataclass
class DINOv2Config:
    """DINOv2 settings (defaults: the DINOv2 / ExPLoRA recipe; shrink the head on CPU).

    Args:
        head_hidden_dim, head_bottleneck_dim, num_prototypes: projection head MLP widths and prototype count
            (2048, 256, 65536 in DINOv2).
        student_temp: student softmax temperature.
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup: teacher temperature warms up linearly from
            ``warmup_teacher_temp`` to ``teacher_temp`` over the first ``teacher_temp_warmup`` fraction of steps.
        centering: ``"softmax"`` (moving-average centre, momentum ``center_momentum``) or ``"sinkhorn"``
            (Sinkhorn-Knopp, ``sinkhorn_iterations``).
        momentum_start: EMA momentum at step 0; it follows a cosine to 1.0 at the last step.
        weight_decay_start, weight_decay_end: cosine weight-decay schedule.
        dino_weight, ibot_weight, koleo_weight: loss weights.
        separate_ibot_head: give the iBOT patch loss its own projection head (same sizes, own EMA teacher
            copy) instead of sharing the DINO head (DINOv2's ``ibot.separate_head``; off by default, as in
            DINOv2's ViT-L recipe).
        mask_probability: fraction of global crops that get an iBOT block mask.
        mask_ratio: (min, max) fraction of the patches masked in a masked crop.
        freeze_last_layer_steps: steps during which the head's last layer is not updated; ``None`` =
            ``min(3000, max_steps // 10)``.
        crops: :class:`~explora_geo.augment.MultiCropConfig` (sizes ``0`` = derived from the backbone:
            global = its ``img_size``, local = 7/16 of it rounded to whole patches).
    """

    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    num_prototypes: int = 65536
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3
    centering: Literal["softmax", "sinkhorn"] = "softmax"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    momentum_start: float = 0.992
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.4
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    separate_ibot_head: bool = False
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    freeze_last_layer_steps: int | None = None
    crops: MultiCropConfig | None = None

    def __post_init__(self) -> None:
        if self.centering not in ("softmax", "sinkhorn"):
            raise ExploraGeoError(f"DINOv2 centering {self.centering!r} is unknown; use softmax or sinkhorn.")
        if isinstance(self.crops, dict):
            self.crops = MultiCropConfig.from_dict(self.crops)
        self.mask_ratio = tuple(self.mask_ratio)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "crops"}
        out["crops"] = self.crops.to_dict() if self.crops else None
        return out


def projection_head(dim: int, hidden: int, bottleneck: int, prototypes: int) -> DINOv2ProjectionHead:
    """lightly's DINOv2 head (MLP ``dim -> hidden -> hidden -> bottleneck``, L2-normalised, then a weight-normed
    prototype layer ``bottleneck -> prototypes`` with unit norm ``g``), its last layer rebuilt with
    ``torch.nn.utils.parametrizations.weight_norm`` (same maths; unlike the deprecated hook version it can be
    deep-copied, which the EMA teacher needs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        head = DINOv2ProjectionHead(dim, hidden, bottleneck, prototypes)
    last = nn.Linear(bottleneck, prototypes, bias=False)
    nn.init.trunc_normal_(last.weight, std=0.02)
    head.last_layer = nn.utils.parametrizations.weight_norm(last)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.fill_(1.0)
    return head


# --------------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------------

def build_teacher(student: nn.Module) -> nn.Module:
    """EMA teacher of ``student``: a copy of its trainable tensors; its frozen parameters and buffers are
    the student's own tensor objects (shared, not copied). The teacher's parameters never require grad."""
    memo: dict[int, Any] = {id(p): p for p in student.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in student.buffers()})
    teacher = copy.deepcopy(student, memo)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_pairs(student: nn.Module, teacher: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(student, teacher) tensors the EMA updates: the student's trainable parameters and their copies."""
    t_params = dict(teacher.named_parameters(remove_duplicate=False))
    s_list, t_list = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            s_list.append(p)
            t_list.append(t_params[name])
    return s_list, t_list


@torch.no_grad()
def ema_update(student: list[Tensor], teacher: list[Tensor], momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, in place, for each pair."""
    if teacher:
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [s.detach() for s in student], alpha=1.0 - momentum)


# --------------------------------------------------------------------------------------------------------
# Loss math (pure functions)
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets (DINOv2 / SwAV): rows of ``[N, K]`` probabilities whose prototype
    marginal is uniform over the whole (all-process) batch. ``N`` may be 0 on some processes (no masked
    patch there): the collectives still run, so processes never wait on each other.

    Args:
        logits: teacher logits ``[N, K]``.
        temp: teacher temperature.
        iterations: normalisation rounds.
    """
    top = logits.detach().float().max() if logits.numel() else logits.new_tensor(float("-inf")).float()
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((logits.float() - top) / temp).t()  # [K, N]; the shift cancels in the normalisation
    n = torch.tensor(float(q.shape[1]), device=q.device)
    k = q.shape[0]
    total = q.sum()
    if _distributed():
        dist.all_reduce(n)
        dist.all_reduce(total)
    q = q / total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(rows)
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


@torch.no_grad()
def update_center(center: Center, x: Tensor) -> None:
    """Moving-average update of a DINO centre with the mean of ``x`` ``[N, K]`` over all processes (weighted
    by their N; N may be 0 on some processes, and every process takes part in the all-reduce)."""
    total = x.float().sum(dim=0, keepdim=True)
    count = torch.tensor(float(x.shape[0]), device=x.device)
    if _distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    if count.item() > 0:
        center.center = center.center * center.momentum + (total / count) * (1.0 - center.momentum)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def cross_view_loss(teacher_probs: list[Tensor], student_logits: list[Tensor], student_temp: float) -> Tensor:
    """DINO cls loss: mean cross-entropy over every (teacher view i, student view j) pair with ``i != j``.

    Args:
        teacher_probs: per global view ``[B, K]`` (centred, sharpened probabilities).
        student_logits: per student view ``[B, K]``; the first ``len(teacher_probs)`` are the same global
            views as the teacher's (pairs of the same view are skipped).
    """
    total, terms = teacher_probs[0].new_zeros(()), 0
    for j, s in enumerate(student_logits):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for i, t in enumerate(teacher_probs):
            if i != j:
                total = total - (t * log_p).sum(-1).mean()
                terms += 1
    return total / max(terms, 1)


def masked_patch_loss(teacher_probs: Tensor, student_logits: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """iBOT loss: cross-entropy on the masked patch tokens, averaged per image then over all images.

    Args:
        teacher_probs, student_logits: ``[M, K]`` for the M masked tokens (in ``masks[masks]`` order).
        masks: ``[N, T]`` bool, the masked tokens of each of the N images (images without a mask count as 0).
    """
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    weight = (1.0 / masks.sum(dim=1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]
    return (ce * weight).sum() / masks.shape[0]


# --------------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------------

class DINOv2Objective(Objective):
    """DINOv2 on a timm ViT or a group-channel ViT (the backbone must accept the local-crop size, e.g. a timm
    ViT created with ``dynamic_img_size=True``).

    Args:
        backbone: the ExPLoRA-adapted student backbone.
        config: :class:`DINOv2Config`.
        mask_token: the source checkpoint's iBOT ``mask_token`` (``[1, D]``, official DINOv2 files have it;
            timm's converted DINOv2 weights do not); ``None`` starts it at zero, as DINOv2 does.
        mask_token_source: where ``mask_token`` comes from, for :attr:`mask_token_source`.

    Attributes:
        mask_token_source: ``"loaded from <source>"`` or ``"new (zeros): ..."``, for the run's reports.
    """

    name = "dinov2"
    betas = (0.9, 0.999)

    def __init__(self, backbone: nn.Module, config: DINOv2Config | None = None, *,
                 mask_token: Tensor | None = None, mask_token_source: str = "the source checkpoint") -> None:
        super().__init__(backbone)
        self.config = cfg = config or DINOv2Config()
        dim = int(backbone.embed_dim)
        self.head = projection_head(dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.num_prototypes)
        self.ibot_head = (projection_head(dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.num_prototypes)
                          if cfg.separate_ibot_head else None)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        if mask_token is not None:
            if mask_token.numel() != dim:
                raise ExploraGeoError(
                    f"{mask_token_source} has a mask_token of shape {tuple(mask_token.shape)}, the backbone is "
                    f"{dim} wide; use DINOv2 weights of the backbone's size."
                )
            with torch.no_grad():
                self.mask_token.copy_(mask_token.reshape(1, dim))
            self.mask_token_source = f"loaded from {mask_token_source}"
        else:
            self.mask_token_source = "new (zeros): the source weights have no DINOv2 mask_token"
        teacher = {"backbone": build_teacher(backbone), "head": build_teacher(self.head)}
        if self.ibot_head is not None:
            teacher["ibot_head"] = build_teacher(self.ibot_head)
        self.teacher = nn.ModuleDict(teacher)
        self.cls_center = Center((1, cfg.num_prototypes), momentum=cfg.center_momentum)
        self.patch_center = Center((1, cfg.num_prototypes), momentum=cfg.center_momentum)
        self.koleo = KoLeoLoss()
        self.crop = MultiCrop(_crop_config(cfg.crops, backbone), rgb=is_rgb_input(backbone))
        self._freeze_steps = 0  # set by set_max_steps
        self._ema: tuple[list[Tensor], list[Tensor]] | None = None
        self.teacher.eval()

    def train(self, mode: bool = True) -> DINOv2Objective:
        """Set the student's mode; the teacher stays in eval mode (its dropout / drop-path never fire)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _student_ibot_head(self) -> nn.Module:
        return self.ibot_head if self.ibot_head is not None else self.head

    def _teacher_ibot_head(self) -> nn.Module:
        return self.teacher["ibot_head"] if self.ibot_head is not None else self.teacher["head"]

    # -- schedules -------------------------------------------------------------------------------------
    def teacher_temp(self, step: int, max_steps: int) -> float:
        """Teacher temperature at ``step`` (linear warm-up, then constant)."""
        warm = int(self.config.teacher_temp_warmup * max_steps)
        if step >= warm:
            return self.config.teacher_temp
        return self.config.warmup_teacher_temp + (self.config.teacher_temp - self.config.warmup_teacher_temp) * (
            step / max(warm, 1))

    def momentum(self, step: int, max_steps: int) -> float:
        """EMA momentum at ``step`` (cosine from ``momentum_start`` to 1)."""
        return cosine(step, max_steps, self.config.momentum_start, 1.0)

    def weight_decay(self, step: int, max_steps: int) -> float:
        """Weight decay at ``step`` (cosine)."""
        return cosine(step, max_steps, self.config.weight_decay_start, self.config.weight_decay_end)

    def freeze_last_layer_steps(self, max_steps: int) -> int:
        """Steps during which the head's last layer is not updated."""
        k = self.config.freeze_last_layer_steps
        return min(3000, max_steps // 10) if k is None else k

    def report(self) -> dict[str, Any]:
        """Mask token origin, crop sizes (px) and counts, solarisation (RGB only), iBOT head layout."""
        crops = self.crop.config
        return {"mask_token": self.mask_token_source, "global_crop_px": crops.global_size,
                "local_crop_px": crops.local_size, "n_global": crops.n_global, "n_local": crops.n_local,
                "solarize": self.crop.rgb, "separate_ibot_head": self.ibot_head is not None}

    def default_lr(self, batch_size: int) -> float:
        """DINOv2 recipe: 1e-3 at 1024 images, square-root scaling."""
        return 1.0e-3 * math.sqrt(batch_size / 1024)

    def student_parameters(self) -> list[nn.Parameter]:
        """Trainable student tensors (backbone, head, mask token); the teacher is excluded."""
        teacher = {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher]

    # -- training --------------------------------------------------------------------------------------
    def _targets(self, logits: Tensor, center: Center, temp: float) -> Tensor:
        if self.config.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.config.sinkhorn_iterations)
        return F.softmax((logits.float() - center.value) / temp, dim=-1)

    def _masks(self, n: int, h: int, w: int, groups: int, device: torch.device) -> Tensor:
        """iBOT block masks ``[n, G, h*w]``: the same spatial blocks in every channel group."""
        lo, hi = self.config.mask_ratio
        spatial = random_block_mask((n, h, w), batch_mask_ratio=self.config.mask_probability,
                                    min_image_mask_ratio=lo, max_image_mask_ratio=hi,
                                    min_num_masks_per_block=min(4, max(1, h * w // 2)),
                                    max_num_masks_per_block=max(4, h * w // 2), device=device)
        return spatial.reshape(n, 1, h * w).expand(n, groups, h * w)

    def forward(self, batch: dict[str, Tensor], step: int = 0, max_steps: int = 1) -> dict[str, Tensor]:
        """DINOv2 loss of a batch (see :meth:`Objective.forward`); ``valid_mask`` is not used."""
        cfg = self.config
        images = batch["image"]
        global_crops, local_crops = self.crop(images)
        b = images.shape[0]
        n_global = len(global_crops)
        groups, h, w = token_grid(self.backbone, *global_crops[0].shape[-2:])
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        temp = self.teacher_temp(step, max_steps)
        globals_ = torch.cat(global_crops)
        masks = self._masks(n_global * b, h, w, groups, images.device)  # [2B, G, L]
        flat_masks = masks.flatten(1)  # [2B, G*L]

        with torch.no_grad():
            t_tokens = self.teacher["backbone"].forward_features(globals_)
            t_cls = self.teacher["head"](t_tokens[:, 0])
            t_patch = self._teacher_ibot_head()(t_tokens[:, prefix:][flat_masks])
            t_cls_probs = self._targets(t_cls, self.cls_center, temp).chunk(n_global)
            t_patch_probs = self._targets(t_patch, self.patch_center, temp)  # [M, K]; M may be 0

        with replaced_tokens(self.backbone, masks, self.mask_token):
            s_tokens = self.backbone.forward_features(globals_)
        s_cls = s_tokens[:, 0]
        s_logits = list(self.head(s_cls).chunk(n_global))
        if local_crops:
            s_local = self.backbone.forward_features(torch.cat(local_crops))[:, 0]
            s_logits += list(self.head(s_local).chunk(len(local_crops)))

        dino = cross_view_loss(list(t_cls_probs), s_logits, cfg.student_temp)
        s_patch = self._student_ibot_head()(s_tokens[:, prefix:][flat_masks])
        ibot = masked_patch_loss(t_patch_probs, s_patch, flat_masks, cfg.student_temp)
        koleo = sum(self.koleo(c.float()) for c in s_cls.chunk(n_global))
        loss = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo

        if cfg.centering == "softmax":
            update_center(self.cls_center, t_cls)
            update_center(self.patch_center, t_patch)
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach(),
                "teacher_temp": loss.new_tensor(temp)}

    def before_optimizer_step(self, step: int) -> None:
        """No update of the head's last layer during the first steps (DINO's stabilisation trick)."""
        if step < self._freeze_steps:
            heads = [self.head] if self.ibot_head is None else [self.head, self.ibot_head]
            for p in (p for h in heads for p in h.last_layer.parameters()):
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, max_steps: int) -> None:
        """EMA update of the teacher's trainable tensors."""
        if self._ema is None:  # the same Parameter objects all run long (moving devices keeps them)
            modules = [(self.backbone, self.teacher["backbone"]), (self.head, self.teacher["head"])]
            if self.ibot_head is not None:
                modules.append((self.ibot_head, self.teacher["ibot_head"]))
            pairs = [ema_pairs(s, t) for s, t in modules]
            self._ema = ([p for s, _ in pairs for p in s], [p for _, t in pairs for p in t])
        ema_update(*self._ema, self.momentum(step, max_steps))

    def set_max_steps(self, max_steps: int) -> None:
        """Fix the schedule length (called by the training module before training)."""
        self._freeze_steps = self.freeze_last_layer_steps(max_steps)


def is_rgb_input(backbone: nn.Module) -> bool:
    """Whether the backbone's input is 3-band RGB: its ``band_names`` are the red, green and blue bands of a
    sensor preset (``R, G, B``; Sentinel-2 ``B04, B03, B02`` ...), or it has no band names and 3 channels."""
    from explora_geo.sensors import SENSORS

    names = getattr(backbone, "band_names", None)
    if names is None:
        return int(getattr(backbone, "in_chans", getattr(getattr(backbone, "patch_embed", None), "in_chans", 0))
                   or 0) == 3
    if len(names) != 3:
        return False
    for sensor in SENSORS.values():
        if sensor.rgb and {sensor.canonical(b) for b in names} == {sensor.canonical(b) for b in sensor.rgb}:
            return True
    return False


def _crop_config(crops: MultiCropConfig | None, backbone: nn.Module) -> MultiCropConfig:
    cfg = copy.copy(crops) if crops is not None else MultiCropConfig()
    patch = patch_size_of(backbone)
    img = img_size_of(backbone)
    if not cfg.global_size:
        cfg.global_size = img
    if not cfg.local_size:
        cfg.local_size = max(patch, int(round(cfg.global_size * 7 / 16 / patch)) * patch)
    for label, size in (("global", cfg.global_size), ("local", cfg.local_size)):
        if size % patch:
            raise ExploraGeoError(f"DINOv2 {label} crop size {size} px is not a multiple of the patch size "
                                  f"{patch}; choose a multiple of {patch}.")
    return cfg

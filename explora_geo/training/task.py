"""ExPLoRA pre-training as a torchgeo task (:class:`ExploraPretrainTask`, a ``torchgeo.tasks.BaseTask``), and its
per-step random state.

``torchgeo fit --config configs/torchgeo_pretrain_s2_tiny_cpu.yaml`` builds it from YAML; ``explora-geo
pretrain`` builds the same task from its flags (:func:`explora_geo.training.trainer.run_pretraining`).

Exact resume: all randomness of a training step (masks, crops, augmentations) is drawn from generators seeded
by ``(seed, step, micro-batch, rank)``, so it does not depend on what ran before; the data module resumes at
its stored position; the loss history travels in the checkpoint; the global RNG states are stored too.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torchgeo.tasks import BaseTask

from explora_geo.errors import ExploraGeoError
from explora_geo.objectives.masking import img_size_of
from explora_geo.training.setup import (
    DEFAULT_WEIGHTS,
    band_spec,
    build_backbone,
    build_normalization,
    build_objective,
    echo,
)

__all__ = ["ExploraPretrainTask", "NonFiniteLossError", "rng_states", "set_rng_states", "warmup_cosine"]

_NO_DECAY = ("cls_token", "reg_token", "pos_embed", "group_embed", "mask_token")


class NonFiniteLossError(ExploraGeoError):
    """The loss became NaN or Inf; training stopped (the last good checkpoint is kept)."""


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear from ~0 to 1 over ``warmup`` steps, then cosine to ``floor``.

    ``step`` counts optimiser steps from 0; the factor applies to the update of step ``step``.
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch (CPU and the current CUDA device) and Python RNGs seeded by ``seed``;
    the surrounding RNG states are restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


class ExploraPretrainTask(BaseTask):
    """ExPLoRA extended pre-training (Khanna et al., ICML 2025, arXiv 2406.10973) as a torchgeo task.

    A ViT pre-trained on natural images continues its own self-supervised objective (MAE or DINOv2) on target
    imagery; only the unfrozen blocks, LoRA on Q and V of the other blocks, the norms and the cls token train
    (:mod:`explora_geo.adapter`). Settings are those of :class:`~explora_geo.training.config.PretrainConfig`
    with the same names and defaults; the run length, batch and devices come from the ``Trainer`` and the data
    module.

    - :meth:`configure_models`: the backbone (``model``/``bands``), its source ``weights`` and the ExPLoRA
      adapter (``unfreeze``, ``rank``, ``alpha``) as ``self.model``; the data scaling ``self.normalization``.
    - :meth:`configure_losses`: the self-supervised objective around ``self.model`` (``self.objective``: it
      owns its heads / decoder / EMA teacher and computes the loss).
    - :meth:`configure_metrics`: the mean objective loss on held-out patches (``val_loss``), when the data
      module has a validation split.

    Batches: ``{"image": [B, C, H, W] float (normalised, bands in ``self.model.band_names`` order),
    "valid_mask": [B, H, W] bool}``. A data module may read what it must deliver from :meth:`data_spec`.

    Args:
        model: timm / explora-geo model name (default per ``bands`` and ``objective``).
        model_kwargs: extra ``create_model`` arguments (e.g. a tiny ``embed_dim``/``depth``/``num_heads``).
        bands: a sensor preset (``sentinel2`` -> the group-channel ViT on its groups) or band names.
        sensor: preset naming the files' bands (default: ``bands`` when it is a preset, else ``sentinel2``).
        weights: source weights (``random``, a file, a timm pretrained name, a torchgeo weight name).
        objective: ``mae`` or ``dinov2``; ``mae`` / ``dinov2``: that objective's settings.
        unfreeze, rank, alpha: the ExPLoRA adapter.
        img_size, patch_size: input and patch size in px (default: the model's).
        normalization, stats: data scaling (``satmae``/``meanstd``/``reflectance``/``none``) and an optional
            statistics JSON of ``explora-geo stats`` (or its content, e.g. a URL store's statistics).
        lr: peak learning rate (``None``: the objective's recipe for the effective batch). warmup_steps: linear
            warm-up (``None``: 5 % of the run). min_lr: final cosine learning rate.
        seed: base seed of the per-step random state.
    """

    ignore = None
    monitor = "val_loss"
    mode = "min"

    def __init__(
        self,
        *,
        model: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        bands: str | list[str] = "sentinel2",
        sensor: str | None = None,
        weights: str | None = None,
        objective: str = "mae",
        mae: dict[str, Any] | None = None,
        dinov2: dict[str, Any] | None = None,
        unfreeze: str | int | list[int] | None = "L",
        rank: int = 64,
        alpha: float = 1.0,
        img_size: int | None = None,
        patch_size: int | None = None,
        normalization: str = "satmae",
        stats: str | dict[str, Any] | None = None,
        lr: float | None = None,
        warmup_steps: int | None = None,
        min_lr: float = 0.0,
        seed: int = 0,
    ) -> None:
        if objective not in ("mae", "dinov2"):
            raise ExploraGeoError(f"unknown objective {objective!r}; use --objective mae or dinov2.")
        if isinstance(unfreeze, str) and unfreeze.strip().lower() == "auto":
            raise ExploraGeoError("unfreeze 'auto' is a block search before the run; use `explora-geo pretrain "
                                  "--unfreeze auto` or `explora-geo select-blocks`, then pass the chosen spec.")
        self.loss_history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []
        self._pending: list[Tensor] = []
        self._tick: float | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._max_steps: int | None = None
        self._batch = 1
        super().__init__()

    # -- torchgeo hooks --------------------------------------------------------------------------------
    def configure_models(self) -> None:
        """Backbone + source weights + ExPLoRA adapter (``self.model``), and the data scaling."""
        from explora_geo.adapter import ExploraConfig, apply_explora
        from explora_geo.models import load_source_weights

        h = self.hparams
        preset, names = band_spec(h.bands)
        backbone, self.architecture, self.model_kwargs = build_backbone(h, preset, names)
        self.source_weights = str(h.weights or DEFAULT_WEIGHTS[h.objective])
        report = load_source_weights(backbone, self.source_weights)
        if report.random:
            echo("WARNING: training from RANDOM weights (--weights random): a smoke run, not ExPLoRA. "
                 f"Pass --weights PATH or a hub name (default {DEFAULT_WEIGHTS[h.objective]}) for real use.")
        else:
            echo(f"source weights: {report.summary()}")
        self.random_weights = bool(report.random)
        self.weights_report = report.to_dict()
        self._source_extra = report.extra
        self._source_name = report.source
        apply_explora(backbone, ExploraConfig(unfreeze=h.unfreeze, rank=int(h.rank), alpha=float(h.alpha)))
        self.model = backbone
        self.sensor = h.sensor or preset or "sentinel2"
        self.normalization = build_normalization(h, self.sensor, list(backbone.band_names))

    def configure_losses(self) -> None:
        """The self-supervised objective (heads / decoder / teacher and loss) around ``self.model``."""
        from explora_geo.adapter import count_parameters

        h = self.hparams
        settings = dict((h.mae if h.objective == "mae" else h.dinov2) or {})
        self.objective = build_objective(h.objective, self.model, settings, self._source_extra, self._source_name)
        self._source_extra = None  # only needed once
        self.weights_report["objective"] = self.objective.report()  # MAE decoder / DINOv2 mask token, crops
        if h.objective == "mae":
            echo(self.objective.decoder_report.summary())  # type: ignore[attr-defined]
        else:
            echo(f"DINOv2 mask token: {self.objective.mask_token_source}; crops "  # type: ignore[attr-defined]
                 f"{self.weights_report['objective']['global_crop_px']} px global, "
                 f"{self.weights_report['objective']['local_crop_px']} px local")
        counts = count_parameters(self.model)
        echo(f"{self.architecture}: {counts['trainable']:,} of {counts['total']:,} backbone parameters train "
             f"(unfreeze {h.unfreeze!r}, LoRA rank {h.rank}); objective {h.objective}")

    def configure_metrics(self) -> None:
        """Mean objective loss over the held-out patches of one validation (``val_loss``)."""
        from torchmetrics import MeanMetric

        self.val_loss = MeanMetric()

    def data_spec(self) -> dict[str, Any]:
        """What the batches must hold: ``bands`` (model input order), ``sensor`` naming the files' bands,
        ``patch_size`` in px, ``normalization`` (a :class:`~explora_geo.normalization.Normalization` or
        ``None``)."""
        return {"bands": list(self.model.band_names), "sensor": self.sensor, "patch_size": img_size_of(self.model),
                "normalization": self.normalization}

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features of ``x`` ``[B, C, H, W]`` (what ``self.model`` returns: pooled ``[B, D]``)."""
        return self.model(x)

    # -- run length and schedule -----------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        """Optimiser steps of the run (schedules are laid out over it): the trainer's."""
        if self._max_steps is None:
            self._max_steps = int(self.trainer.estimated_stepping_batches)
        return self._max_steps

    def images_per_step(self, batch_size: int) -> int:
        """Images one optimiser step consumes on all devices for micro-batches of ``batch_size``."""
        return batch_size * max(self.trainer.accumulate_grad_batches, 1) * self.trainer.world_size

    def resolved_lr(self) -> float:
        """``lr``, or the objective's recipe for the effective batch (needs the data module's batch size)."""
        if self.hparams.lr:
            return float(self.hparams.lr)
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if batch is None:
            raise ExploraGeoError("the data module has no batch_size to derive the learning rate from; "
                                  "pass lr.")
        return self.objective.default_lr(self.images_per_step(int(batch)))

    def resolved_warmup(self) -> int:
        """``warmup_steps``, or 5 % of the run."""
        warmup = self.hparams.warmup_steps
        return int(warmup) if warmup is not None else max(1, self.max_steps // 20)

    def setup(self, stage: str) -> None:
        """Fix the objective's step-count settings to the trainer's run length."""
        if stage == "fit":
            self.objective.set_max_steps(self.max_steps)

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (objective's betas; no decay on biases, norms, tokens, embeddings) + warm-up/cosine lr."""
        trainable = {id(p) for p in self.objective.student_parameters()}
        decay, no_decay = [], []
        for name, p in self.objective.named_parameters():
            if id(p) in trainable:
                (no_decay if p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY else decay).append(p)
        lr, max_steps, warmup = self.resolved_lr(), self.max_steps, self.resolved_warmup()
        wd = self.objective.weight_decay(0, max_steps)
        groups = [{"params": decay, "weight_decay": wd, "scheduled": True},
                  {"params": no_decay, "weight_decay": 0.0, "scheduled": False}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=self.objective.betas)
        floor = float(self.hparams.min_lr) / lr if lr > 0 else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup=warmup, total=max_steps, floor=floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch: objective loss under the step's own random state; stops on NaN/Inf."""
        step = self.global_step
        micro = batch_idx % max(self.trainer.accumulate_grad_batches, 1)
        seed = (int(self.hparams.seed) * 1_000_003 + step * 1009 + micro * 31 + self.global_rank) % (2**63 - 1)
        with _seeded(seed, self.device):
            out = self.objective(batch, step, self.max_steps)
        loss = out["loss"]
        finite = bool(torch.isfinite(loss.detach()).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach())}) at step {step}; training stopped and the last good "
                "checkpoint is kept in the checkpoints folder: check the input data for NaN/Inf, lower --lr, or "
                "use --precision 32-true, then --resume.")
        batch_size = self._batch = int(batch["image"].shape[0])
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for key, value in out.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=batch_size)
        self._pending.append(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Objective hook (e.g. frozen last layer) and the weight-decay schedule, before the step."""
        self.objective.before_optimizer_step(self.global_step)
        wd = self.objective.weight_decay(self.global_step, self.max_steps)
        for group in optimizer.param_groups:
            if group.get("scheduled"):
                group["weight_decay"] = wd

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the objective's post-step update (EMA) and bookkeeping."""
        step = self.global_step
        super().optimizer_step(*args, **kwargs)
        self.objective.after_optimizer_step(step, self.max_steps)
        if self._pending:
            value = float(torch.stack(self._pending).float().mean())
            self.loss_history.append((step, value))
            self._pending.clear()
        now = time.perf_counter()
        if self._tick is not None:
            self.log("img_s", self.images_per_step(self._batch) / max(now - self._tick, 1e-9), prog_bar=True)
        self._tick = now
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    # -- held-out loss ---------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Objective loss of a held-out batch under a random state fixed per batch (the same masks / crops at
        every validation, and for every run with this seed); the objective's state (e.g. the DINO centre)
        is left as it was."""
        state = {name: buffer.clone() for name, buffer in self.objective.named_buffers()}
        seed = (int(self.hparams.seed) * 1_000_003 + 7_777_777 + batch_idx * 31 + self.global_rank) % (2**63 - 1)
        with _seeded(seed, self.device):
            out = self.objective(batch, self.global_step, self.max_steps)
        with torch.no_grad():
            for name, buffer in self.objective.named_buffers():
                buffer.copy_(state[name])
        self.val_loss.update(out["loss"].detach().float(), weight=int(batch["image"].shape[0]))

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` and keep it in ``val_history`` as ``(optimiser steps done, loss)``."""
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", value, prog_bar=True, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.val_history.append((int(self.global_step), float(value)))

    # -- state -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the loss history and the global RNG states."""
        checkpoint["explora_loss_history"] = list(self.loss_history)
        checkpoint["explora_val_history"] = list(self.val_history)
        checkpoint["explora_rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the loss history; the RNG states are restored when training starts."""
        self.loss_history = [tuple(x) for x in checkpoint.get("explora_loss_history", [])]  # type: ignore[misc]
        self.val_history = [tuple(x) for x in checkpoint.get("explora_val_history", [])]  # type: ignore[misc]
        self._rng_to_restore = checkpoint.get("explora_rng_states")

    def on_train_start(self) -> None:
        """Apply RNG states from a resumed checkpoint."""
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def rng_states() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, Python, NumPy) as tensors and plain values, so that they load with
    ``torch.load(weights_only=True)`` (Lightning's resume)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))

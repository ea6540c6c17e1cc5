"""The Lightning module of ExPLoRA pre-training and its per-step random state.

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

import lightning as L
import torch
from torch import Tensor

from explora_geo.errors import ExploraGeoError
from explora_geo.objectives.base import Objective

__all__ = ["ExploraPretrainModule", "NonFiniteLossError", "rng_states", "set_rng_states", "warmup_cosine"]

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


class ExploraPretrainModule(L.LightningModule):
    """Lightning module of ExPLoRA pre-training.

    Args:
        objective: the objective (it holds the adapted backbone and its heads/decoder/teacher).
        max_steps: optimiser steps of the run (schedules are laid out over it).
        lr: peak learning rate. warmup_steps: linear warm-up. min_lr: final learning rate.
        seed: base seed of the per-step random state.
        images_per_step: images consumed by one optimiser step on all devices (for images/s).
    """

    def __init__(self, objective: Objective, *, max_steps: int, lr: float, warmup_steps: int, min_lr: float = 0.0,
                 seed: int = 0, images_per_step: int = 1) -> None:
        super().__init__()
        self.objective = objective
        self.max_steps, self.lr, self.warmup_steps, self.min_lr = max_steps, lr, warmup_steps, min_lr
        self.seed, self.images_per_step = seed, images_per_step
        self.loss_history: list[tuple[int, float]] = []
        self._pending: list[Tensor] = []
        self._tick: float | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        objective.set_max_steps(max_steps)

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (objective's betas; no decay on biases, norms, tokens, embeddings) + warm-up/cosine lr."""
        trainable = {id(p) for p in self.objective.student_parameters()}
        decay, no_decay = [], []
        for name, p in self.objective.named_parameters():
            if id(p) in trainable:
                (no_decay if p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY else decay).append(p)
        wd = self.objective.weight_decay(0, self.max_steps)
        groups = [{"params": decay, "weight_decay": wd, "scheduled": True},
                  {"params": no_decay, "weight_decay": 0.0, "scheduled": False}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.objective.betas)
        floor = self.min_lr / self.lr if self.lr > 0 else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup=self.warmup_steps, total=self.max_steps, floor=floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch: objective loss under the step's own random state; stops on NaN/Inf."""
        step = self.global_step
        micro = batch_idx % max(self.trainer.accumulate_grad_batches, 1)
        seed = (self.seed * 1_000_003 + step * 1009 + micro * 31 + self.global_rank) % (2**63 - 1)
        with _seeded(seed, self.device):
            out = self.objective(batch, step, self.max_steps)
        loss = out["loss"]
        finite = bool(torch.isfinite(loss.detach()).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach())}) at step {step}; training stopped and the last good "
                "checkpoint is kept in the checkpoints folder: check the input data for NaN/Inf, lower --lr, or "
                "use --precision 32-true, then --resume.")
        batch_size = int(batch["image"].shape[0])
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
            self.log("img_s", self.images_per_step / max(now - self._tick, 1e-9), prog_bar=True)
        self._tick = now
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    # -- state -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the loss history and the global RNG states."""
        checkpoint["explora_loss_history"] = list(self.loss_history)
        checkpoint["explora_rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the loss history; the RNG states are restored when training starts."""
        self.loss_history = [tuple(x) for x in checkpoint.get("explora_loss_history", [])]  # type: ignore[misc]
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

"""ExPLoRA pre-training with Lightning: the module, the trainer, and the run from a config to its outputs.

- :class:`PretrainConfig`: every setting of a run (the CLI flags and the YAML config map onto its fields).
- :class:`ExploraPretrainModule`: a LightningModule holding the objective (which holds the adapted backbone,
  its heads and, for DINOv2, the EMA teacher), the AdamW optimiser with warm-up + cosine learning rate and the
  objective's weight-decay schedule, the loss history, and the per-step random state.
- :func:`build_trainer`: Lightning ``Trainer`` with bf16-mixed on GPU, gradient accumulation and clipping,
  DDP for several devices / nodes, atomic checkpoints every N steps, TensorBoard + CSV logs, a progress bar.
- :func:`run_pretraining`: build everything, fit (or resume), write the outputs
  (:mod:`explora_geo.training_outputs`).

Exact resume: all randomness of a training step (masks, crops, augmentations) is drawn from generators seeded
by ``(seed, step, micro-batch, rank)``, so it does not depend on what ran before; the data module resumes at
its stored position; the loss history travels in the checkpoint; the global RNG states are stored too.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from explora_geo.errors import ExploraGeoError
from explora_geo.objectives.base import Objective

__all__ = ["PretrainConfig", "ExploraPretrainModule", "build_trainer", "build_objective", "run_pretraining",
           "warmup_cosine", "NonFiniteLossError", "rng_states", "set_rng_states"]

_NO_DECAY = ("cls_token", "reg_token", "pos_embed", "group_embed", "mask_token")


class NonFiniteLossError(ExploraGeoError):
    """The loss became NaN or Inf; training stopped (the last good checkpoint is kept)."""


@dataclass
class PretrainConfig:
    """All settings of a pre-training run. Field names are the YAML keys and the CLI flags (``_`` -> ``-``).

    Args:
        out: output folder (checkpoints, logs, backbone, adapter, curve, summary).
        data: rasters to train on (folder, glob, file, or a list); ``None`` = the embedded T33UUU sample.
        bands: a sensor preset (``sentinel2`` -> the group-channel ViT on its groups) or band names
            (comma-separated or a list) for a plain timm ViT.
        sensor: preset naming the files' bands; default: ``bands`` when it is a preset, else ``sentinel2``.
        model: timm / explora-geo model name; default per ``bands`` and ``objective``.
        model_kwargs: extra ``create_model`` arguments (e.g. a tiny ``embed_dim``/``depth``/``num_heads``).
        weights: source weights (``random``, a file, a timm pretrained name, a torchgeo weight name);
            default per objective (DINOv2 ViT-L/14 or MAE ViT-L/16).
        objective: ``mae`` or ``dinov2``; ``mae`` / ``dinov2``: that objective's settings
            (:class:`~explora_geo.objectives.mae.MAEConfig`, :class:`~explora_geo.objectives.dinov2.DINOv2Config`).
        unfreeze, rank, alpha: ExPLoRA adapter (:class:`~explora_geo.adapter.ExploraConfig`).
        max_steps: optimiser steps. batch_size: images per device per micro-batch. accumulate: micro-batches
            per optimiser step.
        lr: peak learning rate; ``None`` = the objective's recipe for the effective batch.
        warmup_steps: linear warm-up steps; ``None`` = 5 % of ``max_steps``. min_lr: final cosine lr.
        grad_clip: gradient-norm clip (``None``/0 = off).
        img_size, patch_size: input size and patch size in px (default: the model's).
        normalization: ``satmae`` / ``meanstd`` / ``reflectance`` / ``none`` for the data.
        stats: a statistics JSON of ``explora-geo stats`` whose per-band mean/std replace the sensor's
            built-in ones for ``satmae`` / ``meanstd`` (needed for sensors without built-in statistics).
        accelerator, devices, num_nodes, strategy, precision: Lightning settings (precision default:
            ``bf16-mixed`` on GPU, ``32-true`` on CPU; strategy default: ``ddp`` when several devices/nodes).
        seed, workers, checkpoint_every, log_every: RNG seed, data workers, steps between checkpoints / logs.
        resume: continue from ``out/checkpoints/last.ckpt`` (``True``) or from a given checkpoint path.
        overwrite: start afresh in an ``out`` that already holds a run (its checkpoints are deleted; logs get a
            new version folder; the final outputs are replaced when the new run ends).
        max_nodata_fraction: patches with more nodata are redrawn.
    """

    out: str = "runs/pretrain"
    data: Any = None
    bands: Any = "sentinel2"
    sensor: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    objective: str = "mae"
    mae: dict[str, Any] = field(default_factory=dict)
    dinov2: dict[str, Any] = field(default_factory=dict)
    unfreeze: Any = "L"
    rank: int = 64
    alpha: float = 1.0
    max_steps: int = 1000
    batch_size: int = 64
    accumulate: int = 1
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr: float = 0.0
    grad_clip: float | None = 3.0
    img_size: int | None = None
    patch_size: int | None = None
    normalization: str = "satmae"
    stats: str | None = None
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    resume: Any = False
    overwrite: bool = False
    max_nodata_fraction: float = 0.5

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "the config") -> PretrainConfig:
        """Build from a dict (YAML); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ExploraGeoError(f"{source} has unknown key(s) {', '.join(unknown)}; known keys: "
                                  f"{', '.join(sorted(known))}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def __post_init__(self) -> None:
        if self.objective not in ("mae", "dinov2"):
            raise ExploraGeoError(f"unknown objective {self.objective!r}; use --objective mae or dinov2.")
        for name in ("max_steps", "batch_size", "accumulate", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ExploraGeoError(f"{name} must be >= 1, got {getattr(self, name)}.")


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


# --------------------------------------------------------------------------------------------------------
# Building a run
# --------------------------------------------------------------------------------------------------------

def build_objective(name: str, backbone: torch.nn.Module, settings: dict[str, Any],
                    extra: dict[str, Tensor] | None = None) -> Objective:
    """The objective ``name`` (``mae`` / ``dinov2``) on an adapted ``backbone``.

    Args:
        settings: the objective's config fields (YAML ``mae:`` / ``dinov2:`` section).
        extra: non-encoder tensors of the source checkpoint (``LoadReport.extra``): an MAE decoder, or a
            DINOv2 ``mask_token``.
    """
    in_chans = len(getattr(backbone, "band_names", None) or []) or int(getattr(backbone, "in_chans", 3))
    try:
        if name == "mae":
            from explora_geo.objectives.mae import MAEConfig, MAEObjective

            decoder = {k: v for k, v in (extra or {}).items() if k.startswith("decoder_") or k == "mask_token"}
            has_decoder = any(k.startswith("decoder_") for k in decoder)
            return MAEObjective(backbone, in_chans, MAEConfig(**settings), decoder if has_decoder else None)
        from explora_geo.objectives.dinov2 import DINOv2Config, DINOv2Objective

        objective = DINOv2Objective(backbone, DINOv2Config(**settings))
    except TypeError as err:
        raise ExploraGeoError(f"bad {name} settings {sorted(settings)}: {err}; see docs/pretraining.md.") from None
    token = (extra or {}).get("mask_token")
    if token is not None and token.numel() == objective.mask_token.numel():
        with torch.no_grad():
            objective.mask_token.copy_(token.reshape_as(objective.mask_token))
    return objective


def _precision(config: PretrainConfig) -> str:
    if config.precision:
        return config.precision
    gpu = config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def _world(config: PretrainConfig) -> int:
    devices = config.devices
    if isinstance(devices, int):
        n = devices if devices > 0 else max(torch.cuda.device_count(), 1)
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    else:
        n = max(torch.cuda.device_count(), 1)
    return n * int(config.num_nodes)


def _progress_bar(refresh_rate: int) -> L.Callback:
    """Lightning's tqdm bar (loss, images/s, elapsed and remaining time), without the logger version."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class Bar(TQDMProgressBar):
        def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return Bar(refresh_rate=refresh_rate)


def build_trainer(config: PretrainConfig, out: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning ``Trainer`` of a run (see the module docstring)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    strategy = config.strategy
    if strategy == "auto" and _world(config) > 1:
        strategy = "ddp"
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step:07d}",
                                 auto_insert_metric_name=False, every_n_train_steps=config.checkpoint_every,
                                 save_top_k=1, save_last=True, save_on_exception=False)
    return L.Trainer(
        default_root_dir=out, max_steps=config.max_steps, max_epochs=-1,
        accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy=strategy,
        precision=_precision(config), accumulate_grad_batches=config.accumulate,
        gradient_clip_val=config.grad_clip or None, log_every_n_steps=config.log_every,
        # One version folder per (re)start: a resumed run never overwrites the earlier part of the logs.
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        callbacks=[checkpoint, _progress_bar(max(1, config.log_every // 2)), *callbacks],
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=False,
    )


def run_pretraining(config: PretrainConfig, *, callbacks: Sequence[L.Callback] = (),
                    datamodule: L.LightningDataModule | None = None, echo: Any = print) -> dict[str, Any] | None:
    """Run a pre-training from ``config`` and write its outputs; returns the summary (``None`` off rank 0).

    Args:
        config: the run.
        callbacks: extra Lightning callbacks.
        datamodule: data to use instead of building a :class:`~explora_geo.data.PretrainDataModule` from
            ``config.data`` (batches ``{"image": [B, C, H, W], "valid_mask": [B, H, W]}``).
        echo: where one-line notices go (rank 0 only).

    Raises:
        ExploraGeoError: bad settings, unobtainable weights, bad data, non-finite loss.
    """
    from explora_geo.training_setup import prepare_run
    from explora_geo.training_outputs import write_outputs

    out = Path(config.out)
    ckpt_path = _resume_path(config, out)
    L.seed_everything(config.seed, workers=True, verbose=False)  # model init, heads, decoder
    run = prepare_run(config, datamodule=datamodule, echo=echo)
    world = _world(config)
    module = ExploraPretrainModule(
        run.objective, max_steps=config.max_steps, lr=run.lr, warmup_steps=run.warmup_steps, min_lr=config.min_lr,
        seed=config.seed, images_per_step=config.batch_size * config.accumulate * world)
    trainer = build_trainer(config, out, callbacks)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=ckpt_path)
    except RuntimeError as err:
        if ckpt_path and "state_dict" in str(err):
            raise ExploraGeoError(f"checkpoint {ckpt_path} was written by a run with other settings (model, "
                                  "rank, unfreeze or objective differ); resume with the same settings.") from None
        raise
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    return write_outputs(out, config=config, run=run, module=module, trainer=trainer, wall_time_s=wall,
                         world_size=world, resumed_from=ckpt_path)


def _resume_path(config: PretrainConfig, out: Path) -> str | None:
    if config.resume and config.overwrite:
        raise ExploraGeoError("--resume and --overwrite contradict each other; pass one of them.")
    if not config.resume:
        if (out / "checkpoints" / "last.ckpt").exists():
            if not config.overwrite:
                raise ExploraGeoError(f"{out} already holds a run (checkpoints/last.ckpt); pass --resume to "
                                      "continue it, --overwrite to start afresh, or choose another --out.")
            shutil.rmtree(out / "checkpoints")
        return None
    path = out / "checkpoints" / "last.ckpt" if config.resume is True or config.resume == "true" else Path(
        str(config.resume))
    if not path.exists():
        raise ExploraGeoError(f"cannot resume: checkpoint {path} does not exist; run without --resume first, "
                              "or pass --resume PATH to a .ckpt file.")
    return str(path)

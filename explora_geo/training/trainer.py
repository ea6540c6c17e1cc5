"""The Lightning ``Trainer`` of a pre-training run, and the run itself: from a config to its outputs.

- :func:`build_trainer`: bf16-mixed on GPU, gradient accumulation and clipping, DDP for several devices /
  nodes, atomic checkpoints every N steps, TensorBoard + CSV logs, a progress bar.
- :func:`run_pretraining`: the task (:class:`~explora_geo.training.task.ExploraPretrainTask`) and data module
  (:class:`~explora_geo.training.datamodule.ExploraPretrainDataModule`) for a config, that trainer, fit (or
  resume); the outputs are written by :class:`~explora_geo.training.outputs.PretrainOutputs`.

These are the classes ``torchgeo fit`` builds from YAML: the two paths differ only in where the settings
come from (:func:`task_settings`, :func:`data_settings`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from explora_geo.errors import ExploraGeoError
from explora_geo.training.config import PretrainConfig, precision, world_size
from explora_geo.training.datamodule import ExploraPretrainDataModule
from explora_geo.training.outputs import PretrainOutputs
from explora_geo.training.setup import echo_to
from explora_geo.training.task import ExploraPretrainTask

__all__ = ["build_trainer", "data_settings", "run_pretraining", "task_settings"]

#: PretrainConfig fields that are task arguments (same names).
TASK_FIELDS = ("model", "model_kwargs", "bands", "sensor", "weights", "objective", "mae", "dinov2", "unfreeze",
               "rank", "alpha", "img_size", "patch_size", "normalization", "stats", "lr", "warmup_steps",
               "min_lr", "seed")


def task_settings(config: PretrainConfig) -> dict[str, Any]:
    """The :class:`ExploraPretrainTask` arguments of ``config``; with a prepared store as data and no
    ``stats``, the store's own statistics (:func:`explora_geo.data.store.store_stats_for`)."""
    from explora_geo.data.store import store_stats_for

    settings = {name: getattr(config, name) for name in TASK_FIELDS}
    settings["stats"] = store_stats_for(config.data, config.stats, config.normalization, config.bands)
    return settings


def data_settings(config: PretrainConfig) -> dict[str, Any]:
    """The :class:`ExploraPretrainDataModule` arguments of ``config``."""
    return {"data": config.data, "batch_size": config.batch_size, "num_workers": config.workers,
            "max_nodata_fraction": config.max_nodata_fraction, "seed": config.seed, "holdout": config.holdout,
            "val_samples": config.val_samples}


def _progress_bar(refresh_rate: int) -> L.Callback:
    """Lightning's tqdm bar (loss, images/s, elapsed and remaining time), without the logger version."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class Bar(TQDMProgressBar):
        def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return Bar(refresh_rate=refresh_rate)


def build_trainer(config: PretrainConfig, out: Path, callbacks: Sequence[L.Callback] = (), *,
                  progress: bool = True) -> L.Trainer:
    """The Lightning ``Trainer`` of a run (see the module docstring); ``progress=False``: no progress bar."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    strategy = config.strategy
    if strategy == "auto" and world_size(config) > 1:
        strategy = "ddp"
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step:07d}",
                                 auto_insert_metric_name=False, every_n_train_steps=config.checkpoint_every,
                                 save_top_k=1, save_last=True, save_on_exception=False)
    validate = config.holdout > 0 and config.val_samples > 0
    every = min(config.val_every or config.max_steps, config.max_steps) * config.accumulate  # in micro-batches
    return L.Trainer(
        default_root_dir=out, max_steps=config.max_steps, max_epochs=-1,
        accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy=strategy,
        precision=precision(config), accumulate_grad_batches=config.accumulate,
        gradient_clip_val=config.grad_clip or None, log_every_n_steps=config.log_every,
        # One version folder per (re)start: a resumed run never overwrites the earlier part of the logs.
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        callbacks=[checkpoint, *([_progress_bar(max(1, config.log_every // 2))] if progress else []), *callbacks],
        enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=False,
        limit_val_batches=1.0 if validate else 0, val_check_interval=every if validate else None,
        check_val_every_n_epoch=None if validate else 1,
    )


def run_pretraining(config: PretrainConfig, *, callbacks: Sequence[L.Callback] = (),
                    datamodule: L.LightningDataModule | None = None, echo: Any = None,
                    summary_extra: dict[str, Any] | None = None, outputs: bool = True) -> dict[str, Any] | None:
    """Run a pre-training from ``config`` and write its outputs; returns the summary (``None`` off rank 0).

    Args:
        config: the run.
        callbacks: extra Lightning callbacks.
        datamodule: data to use instead of an :class:`ExploraPretrainDataModule` of ``config``'s data
            settings (batches ``{"image": [B, C, H, W], "valid_mask": [B, H, W]}``).
        echo: where one-line notices go (default: stderr on rank 0).
        summary_extra: more ``summary.json`` fields.
        outputs: write the outputs and show a progress bar (``False``: a trial; returns only ``{"steps",
            "loss_history", "val_history"}``).

    Raises:
        ExploraGeoError: bad settings, unobtainable weights, bad data, non-finite loss.
    """
    out = Path(config.out)
    if outputs and int(config.rank) == 0 and str(config.unfreeze).strip().strip("[]").lower() in ("", "none"):
        # (select-blocks trials may: the 'none' candidate is their norms-only control.)
        raise ExploraGeoError("--rank 0 with --unfreeze none trains no block and no LoRA, only norms and tokens: "
                              "that is not ExPLoRA; pass --rank R > 0 or unfreeze a block (e.g. --unfreeze L).")
    ckpt_path = _resume_path(config, out)
    with echo_to(echo) if echo is not None else contextlib.nullcontext():
        L.seed_everything(config.seed, workers=True, verbose=False)  # model init, heads, decoder
        task = ExploraPretrainTask(**task_settings(config))
        data = datamodule if datamodule is not None else ExploraPretrainDataModule(**data_settings(config))
        writer = PretrainOutputs(str(out), config=config.to_dict(), extra=summary_extra)
        trainer = build_trainer(config, out, [*callbacks, writer] if outputs else list(callbacks),
                                progress=outputs)
        try:
            trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
        except RuntimeError as err:
            if ckpt_path and "state_dict" in str(err):
                raise ExploraGeoError(f"checkpoint {ckpt_path} was written by a run with other settings "
                                      "(model, rank, unfreeze or objective differ); resume with the same "
                                      "settings.") from None
            raise
    if not outputs:
        return {"steps": int(trainer.global_step), "loss_history": [list(x) for x in task.loss_history],
                "val_history": [list(x) for x in task.val_history]}
    return writer.summary


def _resume_path(config: PretrainConfig, out: Path) -> str | None:
    if config.resume and config.overwrite:
        raise ExploraGeoError("--resume and --overwrite contradict each other; pass one of them.")
    if not config.resume:
        if (out / "checkpoints" / "last.ckpt").exists():
            if not config.overwrite:
                raise ExploraGeoError(f"{out} already holds a run (checkpoints/last.ckpt); pass --resume to "
                                      "continue it, --overwrite to start afresh, or choose another --out.")
            shutil.rmtree(out / "checkpoints")
        elif not config.overwrite and out.is_dir():
            # block_search/ is pretrain --unfreeze auto's own search, made just before the run.
            other = sorted(p.name for p in out.iterdir() if p.name != "block_search")
            if other:
                more = ", ..." if len(other) > 4 else ""
                raise ExploraGeoError(f"{out} is not empty (it holds {', '.join(other[:4])}{more}): another run's "
                                      "or tool's outputs would be mixed with this run's; choose another --out, or "
                                      "pass --overwrite to write into it anyway.")
        return None
    path = out / "checkpoints" / "last.ckpt" if config.resume is True or config.resume == "true" else Path(
        str(config.resume))
    if not path.exists():
        raise ExploraGeoError(f"cannot resume: checkpoint {path} does not exist; run without --resume first, "
                              "or pass --resume PATH to a .ckpt file.")
    return str(path)

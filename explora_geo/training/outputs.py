"""What a finished pre-training run leaves in ``--out DIR`` (written on rank 0, each file atomically):

- ``backbone.safetensors`` + ``backbone.json``: the merged backbone and its sidecar
  (:func:`explora_geo.checkpoint.save_backbone`);
- ``adapter.safetensors`` + ``adapter.json``: only the tensors ExPLoRA trained
  (:func:`explora_geo.adapter.adapter_state_dict`) and the config needed to re-apply them;
- ``loss_curve.png``: the loss per optimiser step;
- ``summary.json``: steps, images seen, wall time, trainable/total parameters, first/last loss, device, ...
- ``val_curve.png`` (runs with a held-out split): the held-out loss per validation;
- ``checkpoints/`` (``last.ckpt`` and the latest ``step*.ckpt``) and ``logs/`` (TensorBoard, CSV) come from
  Lightning during training.

:class:`PretrainOutputs` is the Lightning callback that writes them when ``fit`` ends: ``explora-geo pretrain``
adds it to its trainer, and a ``torchgeo fit`` YAML lists it under ``trainer.callbacks``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from explora_geo.atomic import atomic_paths, write_text_atomic
from explora_geo.sensors import get_sensor

__all__ = ["PretrainOutputs", "device_name", "gsd_of", "input_size", "plot_loss_curve", "write_outputs"]


def plot_loss_curve(history: list[tuple[int, float]], path: Path, title: str, ylabel: str = "loss") -> Path:
    """PNG of loss against optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        steps, losses = zip(*history, strict=True)
        ax.plot(steps, losses, lw=1.0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_paths(path) as (tmp,):
            fig.savefig(tmp, format="png")
        return path
    finally:
        plt.close(fig)


def write_outputs(out: Path, *, task: Any, trainer: L.Trainer, wall_time_s: float, resumed_from: str | None,
                  batch_size: int, data: str, config: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the files listed in the module docstring for a fitted
    :class:`~explora_geo.training.task.ExploraPretrainTask`; returns the summary dict.

    Args:
        batch_size: images per device per micro-batch (for ``images_seen``).
        data: where the data came from (one line). config: the settings of the run (JSON-ready).
        extra: more ``summary.json`` fields (e.g. a block search).
    """
    from safetensors.torch import save_file

    from explora_geo.adapter import adapter_state_dict, count_parameters
    from explora_geo.checkpoint import save_backbone

    objective_name = task.hparams.objective
    backbone = task.model
    bands = list(backbone.band_names)
    normalization = task.normalization
    sidecar = {
        "architecture": task.architecture, "model_kwargs": task.model_kwargs, "sensor": task.sensor,
        "gsd_m": gsd_of(task.sensor, bands) if task.sensor else None,
        "normalization": normalization.to_dict() if normalization else None,
        "source_weights": task.source_weights, "objective": objective_name,
    }
    save_backbone(backbone, out / "backbone", sidecar)

    adapter = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(backbone).items()}
    adapter_meta = {"architecture": task.architecture, "model_kwargs": task.model_kwargs, "bands": bands,
                    "source_weights": task.source_weights, "explora": backbone.explora_config.to_dict(),
                    "objective": objective_name}
    with atomic_paths(out / "adapter.safetensors", out / "adapter.json") as (tmp_weights, tmp_json):
        save_file(adapter, tmp_weights)
        tmp_json.write_text(json.dumps(adapter_meta, indent=2))

    history = list(task.loss_history)
    plot_loss_curve(history, out / "loss_curve.png", f"ExPLoRA {objective_name} - {task.architecture}")
    val_history = list(task.val_history)
    if val_history:
        plot_loss_curve(val_history, out / "val_curve.png", f"held-out loss - {task.architecture}",
                        ylabel="held-out loss")
    counts = count_parameters(backbone)
    objective_trainable = sum(p.numel() for p in task.objective.student_parameters())
    steps = int(trainer.global_step)
    summary = {
        "steps": steps,
        "images_seen": steps * task.images_per_step(batch_size),
        "wall_time_s": round(wall_time_s, 3),
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_params_with_heads": objective_trainable,
        "first_loss": history[0][1] if history else None,
        "last_loss": history[-1][1] if history else None,
        "device": device_name(trainer),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "objective": objective_name,
        "architecture": task.architecture,
        "source_weights": task.source_weights,
        "random_weights": task.random_weights,
        "source_weights_report": task.weights_report,
        "input_size": input_size(backbone, task.weights_report.get("objective", {})),
        "data": data,
        "lr": task.resolved_lr(),
        "resumed_from": resumed_from,
        "loss_history": [[s, v] for s, v in history],
        "val_history": [[s, v] for s, v in val_history],
        "config": config,
        **dict(extra or {}),
    }
    text = json.dumps(summary, indent=2, default=str)
    write_text_atomic(out / "summary.json", text)
    return summary


class PretrainOutputs(L.Callback):
    """Writes a pre-training run's outputs (module docstring) when ``fit`` ends, on rank 0.

    Args:
        out: output folder (default: the trainer's ``default_root_dir``).
        config: the run's settings for ``summary.json`` (default: the task's and the data module's
            hyperparameters).
        extra: more ``summary.json`` fields (e.g. a block search), added as given.

    After ``fit``, :attr:`summary` holds the summary dict (``None`` off rank 0).
    """

    def __init__(self, out: str | None = None, config: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.out = out
        self.config = config
        self.extra = dict(extra or {})
        self.summary: dict[str, Any] | None = None
        self._started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(self.out or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        describe = getattr(datamodule, "describe_data", None)
        config = self.config
        if config is None:
            config = {"model": dict(pl_module.hparams),
                      "data": dict(getattr(datamodule, "hparams", {}) or {})}
        batch_size = getattr(datamodule, "batch_size", None) or getattr(pl_module, "_batch", 1)
        wall = time.perf_counter() - (self._started or time.perf_counter())
        self.summary = write_outputs(
            out, task=pl_module, trainer=trainer, wall_time_s=wall, resumed_from=trainer.ckpt_path,
            batch_size=int(batch_size), data=describe() if callable(describe) else type(datamodule).__name__,
            config=config, extra=self.extra)


def input_size(backbone: Any, objective_report: dict[str, Any]) -> dict[str, Any]:
    """``{"img_size": px, "patch_size": px}`` of the trained backbone, plus the DINOv2 crop sizes (px)."""
    from explora_geo.objectives.masking import img_size_of, patch_size_of

    out: dict[str, Any] = {"img_size": img_size_of(backbone), "patch_size": patch_size_of(backbone)}
    for key in ("global_crop_px", "local_crop_px"):
        if key in objective_report:
            out[key] = objective_report[key]
    return out


def gsd_of(sensor: str | None, bands: list[str]) -> float | None:
    """Finest native ground sample distance (m) of ``bands`` in ``sensor`` (the data are read on that grid)."""
    if sensor is None:
        return None
    preset = get_sensor(sensor)
    values = [preset.band(b).gsd_m for b in bands]
    known = [v for v in values if v is not None]
    return min(known) if known else None


def device_name(trainer: L.Trainer) -> str:
    """``"cpu x2"``, ``"NVIDIA H200 x8"``: the accelerator and how many processes trained."""
    root = trainer.strategy.root_device
    name = torch.cuda.get_device_name(root) if root.type == "cuda" else root.type
    return f"{name} x{trainer.world_size}"

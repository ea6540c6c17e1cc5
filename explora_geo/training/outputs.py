"""What a finished pre-training run leaves in ``--out DIR`` (written on rank 0, each file atomically):

- ``backbone.safetensors`` + ``backbone.json``: the merged backbone and its sidecar
  (:func:`explora_geo.checkpoint.save_backbone`);
- ``adapter.safetensors`` + ``adapter.json``: only the tensors ExPLoRA trained
  (:func:`explora_geo.adapter.adapter_state_dict`) and the config needed to re-apply them;
- ``loss_curve.png``: the loss per optimiser step;
- ``summary.json``: steps, images seen, wall time, trainable/total parameters, first/last loss, device, ...
- ``checkpoints/`` (``last.ckpt`` and the latest ``step*.ckpt``) and ``logs/`` (TensorBoard, CSV) come from
  Lightning during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from explora_geo.atomic import atomic_paths, write_text_atomic
from explora_geo.sensors import get_sensor

__all__ = ["device_name", "gsd_of", "plot_loss_curve", "write_outputs"]


def plot_loss_curve(history: list[tuple[int, float]], path: Path, title: str) -> Path:
    """PNG of loss against optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        steps, losses = zip(*history, strict=True)
        ax.plot(steps, losses, lw=1.0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_paths(path) as (tmp,):
            fig.savefig(tmp, format="png")
        return path
    finally:
        plt.close(fig)


def write_outputs(out: Path, *, config: Any, run: Any, module: Any, trainer: L.Trainer, wall_time_s: float,
                  world_size: int, resumed_from: str | None) -> dict[str, Any]:
    """Write the files listed in the module docstring; returns the summary dict."""
    from safetensors.torch import save_file

    from explora_geo.adapter import adapter_state_dict, count_parameters
    from explora_geo.checkpoint import save_backbone

    backbone = run.backbone
    bands = list(backbone.band_names)
    sidecar = {
        "architecture": run.architecture, "model_kwargs": run.model_kwargs, "sensor": run.sensor,
        "gsd_m": gsd_of(run.sensor, bands) if run.sensor else None,
        "normalization": run.normalization.to_dict() if run.normalization else None,
        "source_weights": run.source_weights, "objective": config.objective,
    }
    save_backbone(backbone, out / "backbone", sidecar)

    adapter = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(backbone).items()}
    adapter_meta = {"architecture": run.architecture, "model_kwargs": run.model_kwargs, "bands": bands,
                    "source_weights": run.source_weights, "explora": backbone.explora_config.to_dict(),
                    "objective": config.objective}
    with atomic_paths(out / "adapter.safetensors", out / "adapter.json") as (tmp_weights, tmp_json):
        save_file(adapter, tmp_weights)
        tmp_json.write_text(json.dumps(adapter_meta, indent=2))

    history = list(module.loss_history)
    plot_loss_curve(history, out / "loss_curve.png", f"ExPLoRA {config.objective} - {run.architecture}")
    counts = count_parameters(backbone)
    objective_trainable = sum(p.numel() for p in run.objective.student_parameters())
    steps = int(trainer.global_step)
    summary = {
        "steps": steps,
        "images_seen": steps * config.batch_size * config.accumulate * world_size,
        "wall_time_s": round(wall_time_s, 3),
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_params_with_heads": objective_trainable,
        "first_loss": history[0][1] if history else None,
        "last_loss": history[-1][1] if history else None,
        "device": device_name(trainer),
        "precision": str(trainer.precision),
        "world_size": world_size,
        "objective": config.objective,
        "architecture": run.architecture,
        "source_weights": run.source_weights,
        "random_weights": run.random_weights,
        "source_weights_report": run.weights_report,
        "input_size": input_size(backbone, run.weights_report.get("objective", {})),
        "data": run.data_description,
        "lr": run.lr,
        "resumed_from": resumed_from,
        "loss_history": [[s, v] for s, v in history],
        "config": config.to_dict(),
    }
    text = json.dumps(summary, indent=2, default=str)
    write_text_atomic(out / "summary.json", text)
    return summary


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

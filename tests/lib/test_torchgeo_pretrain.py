"""ExPLoRA pre-training as a torchgeo task: `torchgeo fit` from YAML, one code path with `explora-geo pretrain`,
and the held-out split the task validates on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torchgeo.tasks import BaseTask

REPO = Path(__file__).resolve().parents[2]
TG_YAML = REPO / "configs" / "torchgeo_pretrain_s2_tiny_cpu.yaml"
CLI_YAML = REPO / "configs" / "pretrain_s2_tiny_cpu.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
def test_torchgeo_fit_and_the_cli_train_the_same_parameters_to_the_same_losses(tmp_path: Path) -> None:
    """`torchgeo fit` pre-trains 2 steps from the YAML (embedded sample, CPU); `explora-geo pretrain` with the
    equivalent quick-start config trains exactly the same tensors to the same losses for the same seed."""
    tg_out, cli_out = tmp_path / "torchgeo", tmp_path / "cli"
    torchgeo = str(Path(sys.executable).with_name("torchgeo"))
    run = subprocess.run([torchgeo, "fit", "--config", str(TG_YAML), "--trainer.max_steps", "2",
                          "--trainer.default_root_dir", str(tg_out), "--trainer.enable_progress_bar", "false"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "explora_geo", "pretrain", "--config", str(CLI_YAML),
                          "--max-steps", "2", "--out", str(cli_out)],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    tg, cli = (json.loads((d / "summary.json").read_text()) for d in (tg_out, cli_out))
    assert tg["steps"] == cli["steps"] == 2 and tg["data"] == cli["data"] == "embedded T33UUU sample"
    assert tg["trainable_params"] == cli["trainable_params"] > 0
    assert tg["trainable_params_with_heads"] == cli["trainable_params_with_heads"]
    assert len(tg["loss_history"]) == 2
    assert np.allclose(tg["loss_history"], cli["loss_history"], rtol=0, atol=1e-6), (tg["loss_history"],
                                                                                     cli["loss_history"])
    tg_adapter, cli_adapter = (load_file(d / "adapter.safetensors") for d in (tg_out, cli_out))
    assert sorted(tg_adapter) == sorted(cli_adapter) and "blocks.0.attn.qkv.lora_A.q" in tg_adapter
    for key, value in tg_adapter.items():
        assert torch.allclose(value, cli_adapter[key], atol=1e-6), key
    # the torchgeo run leaves a merged backbone like the CLI's
    assert json.loads((tg_out / "backbone.json").read_text())["explora"]["rank"] == 8


def test_the_yaml_mirrors_the_quick_start_config() -> None:
    """The two configs are the same run: every task/data setting of the YAML equals the CLI config's."""
    from explora_geo.training.trainer import TASK_FIELDS

    tg, cli = yaml.safe_load(TG_YAML.read_text()), yaml.safe_load(CLI_YAML.read_text())
    task = tg["model"]["init_args"]
    # the same task settings on both sides (a key set on one side only would be a different run)
    assert set(task) == {k for k in cli if k in TASK_FIELDS}
    for key, value in task.items():
        assert cli[key] == value, key
    assert tg["data"]["init_args"]["batch_size"] == cli["batch_size"]
    assert tg["data"]["init_args"]["seed"] == cli["seed"]
    trainer = tg["trainer"]
    assert trainer["gradient_clip_val"] == cli["grad_clip"] and trainer["max_steps"] == cli["max_steps"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"], trainer["log_every_n_steps"]) == \
        (cli["accelerator"], cli["devices"], cli["precision"], cli["log_every"])


def test_task_is_a_torchgeo_base_task_built_by_its_hooks(t33uuu_dir: Path) -> None:
    from explora_geo.training import ExploraPretrainTask

    task = ExploraPretrainTask(bands="sentinel2", model="group_channel_vit_tiny_patch8_96",
                               model_kwargs=dict(embed_dim=32, depth=2, num_heads=2), img_size=32,
                               weights="random", rank=4, mae=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    assert isinstance(task, BaseTask) and task.hparams["rank"] == 4 and task.monitor == "val_loss"
    assert task.objective.backbone is task.model  # configure_losses wraps configure_models' backbone
    spec = task.data_spec()
    assert spec["patch_size"] == 32 and spec["bands"][:4] == ["B02", "B03", "B04", "B08"]
    assert spec["normalization"] is not None and spec["normalization"].scheme == "satmae"
    assert task(torch.zeros(2, 10, 32, 32)).shape == (2, 32)


def test_held_out_rows_never_overlap_training_patches(t33uuu_dir: Path) -> None:
    from explora_geo.data.catalog import build_catalog
    from explora_geo.data.sampling import WindowSampler
    from explora_geo.sensors import get_sensor

    catalog = build_catalog(str(t33uuu_dir), bands=get_sensor("sentinel2").model_bands, sensor="sentinel2")
    height = catalog.sources[0].height
    train = WindowSampler(catalog.sources, 32, rows=(0.0, 0.75))
    held = WindowSampler(catalog.sources, 32, rows=(0.75, 1.0))
    rng = np.random.default_rng(0)
    train_rows = [train.draw(rng).row for _ in range(500)]
    held_rows = [held.draw(rng).row for _ in range(500)]
    cut = round(0.75 * height)
    assert max(train_rows) + 32 <= cut <= min(held_rows)
    assert max(held_rows) + 32 <= height and min(train_rows) >= 0
    assert max(train_rows) + 32 > cut - 8 and min(held_rows) < cut + 8  # the bands are used up to the margin


def test_task_refuses_unfreeze_auto_with_a_pointer_to_the_search() -> None:

    from explora_geo.errors import ExploraGeoError
    from explora_geo.training import ExploraPretrainTask

    with pytest.raises(ExploraGeoError, match="select-blocks"):
        ExploraPretrainTask(unfreeze="auto", weights="random")

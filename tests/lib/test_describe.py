"""Tests of ``explora-geo describe`` (through ``explora_geo.cli.main`` and once as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from explora_geo.cli import main


def run_json(capsys, *argv: str) -> dict:
    assert main(["describe", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_configuration_as_json(capsys) -> None:
    info = run_json(capsys, "--model", "vit_large_patch14_dinov2")
    assert info["trainable_params"] / 1e6 == pytest.approx(18.7, abs=0.05)
    assert info["total_params"] / 1e6 == pytest.approx(304.4 + 6.03, abs=0.1)  # ViT-L/14 + the LoRA tensors
    assert info["unfrozen_blocks"] == [23] and info["depth"] == 24
    assert info["by_category"]["lora"]["trainable"] == 23 * 2 * 64 * 2048
    assert sum(c["trainable"] for c in info["by_category"].values()) == info["trainable_params"]


def test_options_change_the_count(capsys) -> None:
    base = run_json(capsys, "--model", "vit_base_patch14_dinov2", "--unfreeze", "1,L", "--rank", "0")
    assert base["unfrozen_blocks"] == [0, 11] and base["by_category"]["lora"]["total"] == 0
    assert base["trainable_params"] == 2 * 7_089_408 + (10 * 2 + 1) * 2 * 768 + 768
    kv = run_json(capsys, "--model", "vit_base_patch14_dinov2", "--rank", "8", "--targets", "k,v", "--alpha", "16")
    assert kv["explora"]["targets"] == ["k", "v"] and kv["explora"]["alpha"] == 16.0
    assert kv["by_category"]["lora"]["trainable"] == 11 * 2 * 8 * (768 + 768)


def test_group_channel_model_uses_the_sensor_groups(capsys) -> None:
    info = run_json(capsys, "--model", "group_channel_vit_base_patch8_96", "--bands", "sentinel2", "--unfreeze",
                    "1,L", "--rank", "32")
    assert info["bands"] == ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    emb = info["by_category"]["embeddings"]
    assert emb["trainable"] == emb["total"]  # new patch embeddings + encodings train on group-channel ViTs
    # 10 bands into 3 patch embeddings (8x8 kernels) + biases, pos [144, 768-256], group [3, 256], cls
    assert emb["total"] == 10 * 64 * 768 + 3 * 768 + 144 * (768 - 256) + 3 * 256 + 768


def test_plain_vit_with_sensor_bands_gets_that_many_channels(capsys) -> None:
    info = run_json(capsys, "--model", "vit_small_patch16_224", "--bands", "landsat8", "--rank", "0")
    assert len(info["bands"]) == 6
    assert info["by_category"]["embeddings"]["total"] == 6 * 16 * 16 * 384 + 384 + 197 * 384 + 384


def test_table_output(capsys) -> None:
    assert main(["describe", "--model", "vit_base_patch14_dinov2"]) == 0
    out = capsys.readouterr().out
    assert "blocks_unfrozen" in out and "7,089,408" in out
    assert "trainable: 9.29M of 88.74M" in out and "block(s) 12 of 12" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "vit_bsae_patch16_224"], "did you mean vit_base_patch16_224"),
        (["--model", "vit_base_patch16_224", "--bands", "sentinel3"], "'sentinel3'"),
        (["--model", "vit_base_patch16_224", "--rank", "-4"], "-4"),
        (["--model", "vit_base_patch16_224", "--unfreeze", "1,13"], "depth 12"),
        (["--model", "vit_base_patch16_224", "--unfreeze", "L-x"], "'L-x'"),
        (["--model", "vit_base_patch16_224", "--targets", "q,mlp"], "'mlp'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle) -> None:
    assert main(["describe", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("explora-geo describe: error: ") and needle in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_console_script_subprocess(repo_root: Path) -> None:
    exe = Path(sys.executable).with_name("explora-geo")
    ok = subprocess.run([str(exe), "describe", "--model", "vit_base_patch14_dinov2", "--json"],
                        capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["trainable_params"] / 1e6 == pytest.approx(9.3, abs=0.05)
    bad = subprocess.run([str(exe), "describe", "--model", "vit_base_patch16_224", "--unfreeze", "L-12"],
                         capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("explora-geo describe: error: --unfreeze item 'L-12' is block 0 but the model "
                                  "has depth 12 (blocks 1..12, 1-based); use an item within 1..L.")

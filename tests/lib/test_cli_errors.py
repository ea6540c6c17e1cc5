"""Issue 2, acceptance 6: a bad checkpoint gets one clear line and exit status 2 from every command that reads one."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from explora_geo.cli import main


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing was printed"
    last = err[-1]
    assert last.startswith("explora-geo ") and ": error: " in last
    assert not any(line.startswith("Traceback") for line in err)
    return last


@pytest.fixture()
def corrupt(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"broken{suffix}"
        path.write_bytes(b"\x00not a checkpoint\xff" * 64)
        files[suffix] = path
    return files


@pytest.fixture()
def vit_small_file(tmp_path: Path) -> Path:
    path = tmp_path / "vit_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), path)
    return path


def _pretrain(tmp_path: Path, weights: Path) -> list[str]:
    return ["pretrain", "--bands", "B04,B03,B02", "--model", "vit_tiny_patch16_224", "--weights", str(weights),
            "--max-steps", "1", "--batch-size", "2", "--img-size", "32", "--accelerator", "cpu",
            "--out", str(tmp_path / "run")]


def test_corrupt_source_weights(tmp_path: Path, corrupt: dict[str, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_pretrain(tmp_path, corrupt[".pth"])) == 2
    assert "broken.pth" in _one_line_error(capsys)
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_checkpoint_of_another_architecture(tmp_path: Path, vit_small_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_pretrain(tmp_path, vit_small_file)) == 2
    line = _one_line_error(capsys)
    # Names a mismatching tensor and both shapes (ViT-S is 384 wide, ViT-Ti 192).
    assert "vit_small.pth" in line and "384" in line and "192" in line
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


@pytest.mark.parametrize("command", ["probe", "export"])
def test_corrupt_backbone_file(tmp_path: Path, corrupt: dict[str, Path], command: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = corrupt[".safetensors"]
    argv = (["probe", "--backbone", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "p")]
            if command == "probe" else
            ["export", "--checkpoint", str(bad), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert main(argv) == 2
    assert "broken" in _one_line_error(capsys)
    assert not (tmp_path / "m.onnx").exists()

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


def _tiny_s2(out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", "configs/pretrain_s2_tiny_cpu.yaml", "--max-steps", "1", "--batch-size", "2",
            "--out", str(out), *extra]


@pytest.mark.parametrize("argv", [["pretrain", "--img-size", "30"], ["select-blocks", "--img-size", "30"]])
def test_img_size_not_a_multiple_of_the_patch(tmp_path: Path, argv: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Caught when the model is built (not as timm's AssertionError at the first forward pass), nothing written."""
    full = _tiny_s2(tmp_path / "run", *argv[1:])
    if argv[0] == "select-blocks":
        full = ["select-blocks", "--config", full[2], "--steps", "2", "--candidates", "L", *full[5:]]
    assert main(full) == 2
    line = _one_line_error(capsys)
    assert "img_size 30 px" in line and "patch size 8 px" in line and "e.g. 32" in line
    assert not (tmp_path / "run").exists()


def test_rank_0_with_no_block_unfrozen_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_tiny_s2(tmp_path / "run", "--rank", "0", "--unfreeze", "none")) == 2
    assert "--rank 0 with --unfreeze none" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_out_holding_another_tools_outputs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A probe folder (or a torchgeo fit's outputs: no checkpoints/last.ckpt) is not silently mixed with a run."""
    out = tmp_path / "probe"
    out.mkdir()
    (out / "probe.json").write_text("{}")
    assert main(_tiny_s2(out)) == 2
    assert f"{out} is not empty (it holds probe.json)" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["probe.json"]


def test_a_mistyped_sensor_preset_is_named_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--bands sentinel9`` is a typo of a preset, not an unknown band of Sentinel-2."""
    assert main(_tiny_s2(tmp_path / "run", "--bands", "sentinel9")) == 2
    assert "'sentinel9' is not a sensor preset; did you mean sentinel2?" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["stats", "prepare"])
def test_data_flags_are_read_alike_by_stats_and_prepare(command: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``stats`` and ``prepare`` share one reading of --bands/--band-names/--dn-offset (cli/_data_args.py)."""
    from explora_geo.cli import build_parser
    from explora_geo.cli._data_args import data_args

    extra = ["--out", str(tmp_path / "store"), "--patches", "4", "--patch-size", "16"] if command == "prepare" else []
    args = build_parser().parse_args([command, "--data", str(tmp_path), "--bands", " B04, B02 ,",
                                      "--band-names", "B02, B04", "--dn-offset", "1000", *extra])
    chosen = data_args(args)
    assert chosen.bands == ["B04", "B02"] and chosen.band_names == ["B02", "B04"] and chosen.dn_offset == 1000.0
    assert chosen.sensor.name == "sentinel2"
    preset = data_args(build_parser().parse_args([command, "--data", str(tmp_path), "--bands", "sentinel2_l2a",
                                                  *extra]))
    assert preset.sensor.name == "sentinel2_l2a" and "B10" not in preset.bands and preset.dn_offset == "auto"
    assert main([command, "--data", str(tmp_path), "--bands", "B04", "--dn-offset", "lots", *extra]) == 2
    assert "--dn-offset 'lots' is not 'auto' or a number" in _one_line_error(capsys)
    assert not (tmp_path / "store").exists()

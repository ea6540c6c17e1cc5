"""`explora-geo probe`: the JSON line, its files, one-line errors, and the pretrain -> probe hand-off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_downstream_common import S2_L1C_FILE_ORDER, make_backbone, make_chip_folder

from explora_geo.cli import main


def _probe(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["probe", *args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_probe_prints_one_json_line_and_writes_its_files(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    weights = make_backbone(tmp_path / "bb", depth=2)
    data = make_chip_folder(tmp_path / "chips", {"dark": 8, "nir": 8, "swir": 8},
                            names=["B11", "B02", "B08", "B03", "B04", "B05", "B06", "B07", "B8A", "B12"])
    out = tmp_path / "out"
    line = _probe(capsys, "--backbone", str(weights), "--data", str(data), "--out", str(out), "--epochs", "20",
                  "--device", "cpu")
    assert {"top1", "knn_top1", "per_class", "head"} <= set(line)
    assert set(line["per_class"]) == {"dark", "nir", "swir"}
    assert line["head"]["feature_set"] in {"cls1", "cls1+avg"}  # a 2-block backbone has no "last 4"
    assert 1e-4 <= line["head"]["lr"] <= 0.1
    # each class has one band 3000 DN brighter: easy even for a random backbone
    assert line["top1"] >= 0.6
    head = json.loads((out / "head.json").read_text())
    assert head["classes"] == ["dark", "nir", "swir"] and head["feature_set"] == line["head"]["feature_set"]
    full = json.loads((out / "probe.json").read_text())
    assert full["top1"] == line["top1"] and len(full["head"]["grid"]) == 2 * 7
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("problem", ["empty_class", "single_class", "missing_band", "no_test_split",
                                     "l1c_backbone_on_l2a"])
def test_probe_input_errors_are_one_line_exit_2(problem: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = make_backbone(tmp_path / "bb", depth=1)
    if problem == "l1c_backbone_on_l2a":  # a 13-band L1C backbone (needs B10) on 12-band L2A chips
        weights = make_backbone(tmp_path / "l1c", depth=1, band_groups=[S2_L1C_FILE_ORDER])
        data = make_chip_folder(tmp_path / "chips", {"a": 3, "b": 3},
                                names=[b for b in S2_L1C_FILE_ORDER if b != "B10"])
    elif problem == "missing_band":
        data = make_chip_folder(tmp_path / "chips", {"a": 3, "b": 3}, names=["B02", "B03", "B04", "B08"])
    else:
        data = make_chip_folder(tmp_path / "chips", {"a": 3} if problem == "single_class" else {"a": 3, "b": 3})
    if problem == "empty_class":
        (data / "c").mkdir()
    split = ["--split", "0.8,0.2,0"] if problem == "no_test_split" else []
    args = ["probe", "--backbone", str(weights), "--data", str(data), "--out", str(tmp_path / "o"), *split]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("explora-geo probe: error:")
    expected = {"empty_class": "holds no GeoTIFF", "single_class": "single class",
                "missing_band": "lacks band(s) B05, B06, B07, B8A, B11, B12",
                "no_test_split": "needs validation and test splits",
                "l1c_backbone_on_l2a": "lacks band(s) B10 "}[problem]
    assert expected in err


@pytest.mark.slow
def test_pretrain_then_probe_on_real_data(t33uuu_dir: Path, eurosat_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Acceptance: a tiny backbone that `explora-geo pretrain` trained (very briefly) on the real T33UUU scene
    is probed on real EuroSAT; the random initialisation of the same architecture is probed too. Both
    numbers are reported; no improvement is asserted (a few CPU steps)."""
    repo = Path(__file__).resolve().parents[2]
    run = tmp_path / "pretrain"
    assert main(["pretrain", "--config", str(repo / "configs" / "pretrain_s2_tiny_cpu.yaml"),
                 "--data", str(t33uuu_dir), "--max-steps", "8", "--batch-size", "8", "--checkpoint-every", "8",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    # the same architecture, bands and normalisation, randomly initialised
    import torch

    from explora_geo.checkpoint import build_from_sidecar, read_sidecar, save_backbone

    sidecar = read_sidecar(run / "backbone.json")
    torch.manual_seed(0)
    random_init, _ = save_backbone(build_from_sidecar(sidecar), tmp_path / "random", sidecar)
    common = ["--data", str(eurosat_dir), "--bands", "eurosat", "--epochs", "50", "--device", "cpu"]
    pretrained = _probe(capsys, "--backbone", str(run / "backbone.safetensors"), "--out", str(tmp_path / "p1"),
                        *common)
    baseline = _probe(capsys, "--backbone", str(random_init), "--out", str(tmp_path / "p2"), *common)
    with capsys.disabled():
        print(f"\nEuroSAT-200 linear probe: pretrained (8 MAE steps on T33UUU) top1={pretrained['top1']:.3f} "
              f"knn={pretrained['knn_top1']:.3f}; random init top1={baseline['top1']:.3f} "
              f"knn={baseline['knn_top1']:.3f}")
    assert pretrained["top1"] > 0.2 and baseline["top1"] > 0.2  # both clearly above chance (0.1)

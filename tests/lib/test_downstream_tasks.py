"""torchgeo integration: registered backbones, weights entries, fine-tuning modes, `torchgeo fit`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_downstream_common import make_backbone, make_chip_folder
from torchgeo.tasks import Classification

from explora_geo.downstream.backbones import backbone_weights, register_backbone
from explora_geo.downstream.datamodule import ChipFolderDataModule
from explora_geo.downstream.tasks import ExploraClassificationTask, backbone_from_checkpoint
from explora_geo.errors import ExploraGeoError

REPO = Path(__file__).resolve().parents[2]
BACKBONES = {
    "group_channel": dict(architecture="group_channel_vit_tiny_patch8_96"),
    "plain_vit": dict(architecture="vit_tiny_patch16_224", patch_size=8, in_chans=4),
}


def _assert_backbone_equals_file(model: torch.nn.Module, weights: Path) -> None:
    state = load_file(weights)
    own = model.state_dict()
    assert set(state) == {k for k in own if not k.startswith("head.")}
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_registered_backbone_in_stock_torchgeo_classification(kind: str, tmp_path: Path) -> None:
    weights = make_backbone(tmp_path / kind, **BACKBONES[kind])
    name = register_backbone(weights, name=f"explora_test_{kind}")
    n_bands = len(json.loads(weights.with_suffix(".json").read_text())["bands"])
    task = Classification(model=name, weights=True, in_channels=n_bands, num_classes=4)
    _assert_backbone_equals_file(task.model, weights)
    assert task.model.get_classifier().out_features == 4
    assert task.model(torch.zeros(2, n_bands, 32, 32)).shape == (2, 4)
    assert task.model.pretrained_cfg["file"] == str(weights.resolve())
    # pretrained=False: same architecture, other (random) weights
    fresh = timm.create_model(name, pretrained=False, num_classes=0)
    assert fresh.state_dict().keys() == load_file(weights).keys()
    with pytest.raises(ExploraGeoError, match=f"takes {n_bands} bands"):
        Classification(model=name, weights=True, in_channels=n_bands + 3, num_classes=4)


def test_pretrained_overlay_file_is_loaded_and_checked(tmp_path: Path) -> None:
    first = make_backbone(tmp_path / "a", seed=0)
    second = make_backbone(tmp_path / "b", seed=1)
    deeper = make_backbone(tmp_path / "c", depth=3)
    name = register_backbone(first, name="explora_test_overlay")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(second)))
    _assert_backbone_equals_file(model, second)
    with pytest.raises(ExploraGeoError, match="does not match architecture|not the"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(deeper)))


def test_incomplete_weights_are_an_error_not_a_silent_partial_load(tmp_path: Path) -> None:
    weights = make_backbone(tmp_path / "bb")
    state = load_file(weights)
    del state["blocks.1.attn.qkv.weight"]
    save_file(state, weights)
    name = register_backbone(weights, name="explora_test_broken")
    with pytest.raises(ExploraGeoError, match="blocks.1.attn.qkv.weight"):
        Classification(model=name, weights=True, in_channels=10, num_classes=3)
    with pytest.raises(ExploraGeoError, match="blocks.1.attn.qkv.weight"):
        ExploraClassificationTask(weights=str(weights), num_classes=3)


def test_weights_entry_carries_bands_and_normalisation(tmp_path: Path) -> None:
    weights = make_backbone(tmp_path / "bb")
    entry = backbone_weights(weights)
    assert entry.meta["bands"][:4] == ["B02", "B03", "B04", "B08"]
    assert entry.transforms.scheme == "reflectance" and list(entry.transforms.bands) == entry.meta["bands"]
    assert load_file(weights).keys() == entry.get_state_dict().keys()
    task = ExploraClassificationTask(weights=entry, num_classes=3)
    _assert_backbone_equals_file(task.model, weights)
    assert task.hparams["backbone_meta"]["bands"] == entry.meta["bands"]
    assert task.hparams["in_channels"] == 10


def _trainable(task: ExploraClassificationTask) -> dict[str, int]:
    return {n: p.numel() for n, p in task.model.named_parameters() if p.requires_grad}


def test_fine_tuning_modes(tmp_path: Path) -> None:
    weights = str(make_backbone(tmp_path / "bb", depth=2))
    full = ExploraClassificationTask(weights=weights, num_classes=3, mode="full")
    assert len(_trainable(full)) == len(list(full.model.parameters()))
    probe = ExploraClassificationTask(weights=weights, num_classes=3, mode="linear_probe")
    assert set(_trainable(probe)) == {"head.weight", "head.bias"}
    lora = ExploraClassificationTask(weights=weights, num_classes=3, mode="lora", lora_rank=8)
    trainable = _trainable(lora)
    lora_params = {n: v for n, v in trainable.items() if "lora" in n}
    # peft LoRA on the fused qkv of 2 blocks, rank 8, D = 192: A [8, 192] and B [576, 8] per block
    assert sum(lora_params.values()) == 2 * 8 * (192 + 3 * 192)
    assert all(".attn.qkv.lora_" in n for n in lora_params)
    assert {n.rsplit(".", 3)[-3:][0] for n in set(trainable) - set(lora_params)} == {"modules_to_save"}
    assert sum(v for n, v in trainable.items() if "lora" not in n) == 192 * 3 + 3  # the classifier
    with pytest.raises(ExploraGeoError, match="unknown fine-tuning mode"):
        ExploraClassificationTask(weights=weights, num_classes=3, mode="adapter")
    with pytest.raises(ExploraGeoError, match="takes 10 bands"):
        ExploraClassificationTask(weights=weights, num_classes=3, in_channels=3)


def test_lora_fit_keeps_frozen_weights_and_checkpoint_gives_merged_backbone(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    weights = str(make_backbone(tmp_path / "bb", depth=2))
    data = ChipFolderDataModule(str(make_chip_folder(tmp_path / "chips", {"a": 5, "b": 5, "c": 5})),
                                backbone=weights, batch_size=4)
    task = ExploraClassificationTask(weights=weights, num_classes=3, mode="lora", lr=0.05)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = Trainer(max_epochs=1, limit_val_batches=1, accelerator="cpu", logger=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)
    after = task.model.state_dict()
    frozen = [k for k in before if "lora" not in k and "modules_to_save" not in k]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert task.hparams["class_names"] == ["a", "b", "c"]

    ckpt = tmp_path / "task.ckpt"
    trainer.save_checkpoint(ckpt)
    # A standard peft adapter was saved at the end of fit; peft puts it onto a fresh backbone.
    from peft import PeftModel

    from explora_geo.checkpoint import load_backbone

    adapter = tmp_path / "lora_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["qkv"]
    assert config["modules_to_save"] == ["head"] and config["base_model_name_or_path"] == weights
    assert (adapter / "adapter_model.safetensors").is_file()
    fresh, _ = load_backbone(weights, num_classes=3)
    restored = PeftModel.from_pretrained(fresh, adapter).eval()
    x = torch.randn(2, 10, 32, 32)
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), task.model(x), rtol=1e-5, atol=1e-5)
    backbone, sidecar = backbone_from_checkpoint(ckpt)
    assert not any("lora" in k for k in backbone.state_dict())
    with torch.no_grad():
        expected = task.model.forward_head(task.model.forward_features(x), pre_logits=True)
        assert torch.allclose(backbone(x), expected, atol=1e-5)
    assert sidecar["bands"] == data.bands and "weights_file" not in sidecar
    with pytest.raises(ExploraGeoError, match="does not exist"):
        backbone_from_checkpoint(tmp_path / "missing.ckpt")


def test_datamodule_needs_a_backbone_or_bands(tmp_path: Path) -> None:
    root = str(make_chip_folder(tmp_path / "chips", {"a": 3, "b": 3}))
    with pytest.raises(ExploraGeoError, match="needs a backbone"):
        ChipFolderDataModule(root)
    data = ChipFolderDataModule(root, bands=["B04", "B03"], batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 2, 16, 16) and data.classes == ["a", "b"]


@pytest.mark.slow
def test_torchgeo_fit_cli_then_probe_and_export(eurosat_dir: Path, tmp_path: Path) -> None:
    """Acceptance: `torchgeo fit --config configs/torchgeo_eurosat_classification.yaml` for one epoch on CPU on
    the real EuroSAT chips; the checkpoint is probed (`explora-geo probe`) and exported (`explora-geo export`)."""
    from explora_geo.cli import main

    weights = str(make_backbone(tmp_path / "bb", depth=2))
    root = tmp_path / "fit"
    cmd = [str(Path(sys.executable).with_name("torchgeo")), "fit",
           "--config", str(REPO / "configs" / "torchgeo_eurosat_classification.yaml"),
           "--model.init_args.weights", weights, "--data.init_args.backbone", weights,
           "--data.init_args.root", str(eurosat_dir), "--trainer.max_epochs", "1",
           "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root),
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = root.rglob("*.ckpt")

    out = tmp_path / "probe"
    assert main(["probe", "--backbone", str(ckpt), "--data", str(eurosat_dir), "--bands", "eurosat",
                 "--out", str(out), "--epochs", "30"]) == 0
    assert (out / "backbone.safetensors").is_file() and (out / "confusion_matrix.png").is_file()
    assert main(["export", "--checkpoint", str(out / "backbone.safetensors"), "--head", str(ckpt),
                 "--out", str(tmp_path / "model.onnx")]) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["class_names"][0] == "AnnualCrop" and len(meta["class_names"]) == 10


def test_task_on_a_registered_name_keeps_the_sidecar_for_its_checkpoint(tmp_path: Path) -> None:
    weights = make_backbone(tmp_path / "bb")
    name = register_backbone(weights, name="explora_test_task_name")
    task = ExploraClassificationTask(model=name, weights=True, in_channels=10, num_classes=3)
    _assert_backbone_equals_file(task.model, weights)
    assert task.hparams["backbone_meta"]["weights_file"] == str(weights.resolve())
    ckpt = tmp_path / "t.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    backbone, sidecar = backbone_from_checkpoint(ckpt)
    _assert_backbone_equals_file(backbone, weights)

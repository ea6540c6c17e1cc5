"""Pre-training runs on the real T33UUU scene (tiny group-channel ViT, CPU, few steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file

import explora_geo.models  # noqa: F401
from explora_geo.checkpoint import load_backbone
from explora_geo.errors import ExploraGeoError
from explora_geo.training import NonFiniteLossError, PretrainConfig, run_pretraining, warmup_cosine

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def tiny_config(data: Path, out: Path, objective: str = "mae", **overrides: Any) -> PretrainConfig:
    settings: dict[str, Any] = dict(
        out=str(out), data=str(data), bands="sentinel2", model="group_channel_vit_tiny_patch8_96",
        model_kwargs=TINY, img_size=32, weights="random", objective=objective, unfreeze="L", rank=4,
        max_steps=20, batch_size=8, lr=2e-3, warmup_steps=2, accelerator="cpu", devices=1,
        checkpoint_every=5, log_every=5, seed=0,
        mae=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
        dinov2=dict(head_hidden_dim=32, head_bottleneck_dim=16, num_prototypes=64, centering="sinkhorn",
                    teacher_temp=0.04, momentum_start=0.9, crops=dict(global_size=0, local_size=0, n_local=2)),
    )
    settings.update(overrides)
    return PretrainConfig.from_dict(settings)


def quiet(_: str) -> None:
    pass


def falls(history: list[list[float]]) -> bool:
    losses = [v for _, v in history]
    return sum(losses[:4]) / 4 > sum(losses[-4:]) / 4


def test_warmup_cosine() -> None:
    assert warmup_cosine(0, warmup=4, total=10) == pytest.approx(0.25)
    assert warmup_cosine(3, warmup=4, total=10) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup=4, total=10, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(7, warmup=4, total=10) == pytest.approx(0.5)


def test_mae_loss_falls_frozen_weights_unchanged_and_outputs(t33uuu_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("group_channel_vit_tiny_patch8_96", img_size=32, **TINY)
    weights = tmp_path / "source.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "run"
    summary = run_pretraining(tiny_config(t33uuu_dir, out, weights=str(weights)), echo=quiet)
    assert summary is not None and summary["steps"] == 20 and summary["images_seen"] == 160
    assert falls(summary["loss_history"]), summary["loss_history"]
    for name in ("backbone.safetensors", "backbone.json", "adapter.safetensors", "adapter.json", "loss_curve.png",
                 "summary.json", "checkpoints/last.ckpt", "logs/csv/version_0/metrics.csv"):
        assert (out / name).is_file(), name
    assert any((out / "logs" / "tensorboard").glob("version_0/events.out.tfevents.*"))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["first_loss"] == summary["first_loss"] and on_disk["device"] == "cpu x1"
    assert 0 < on_disk["trainable_params"] < on_disk["total_params"]
    assert on_disk["input_size"] == {"img_size": 32, "patch_size": 8}
    decoder = on_disk["source_weights_report"]["objective"]["decoder"]
    assert decoder["source_has_decoder"] is False and decoder["loaded"] == [] and "blocks.0.attn.qkv.weight" in (
        decoder["new"])
    assert on_disk["source_weights_report"]["objective"]["norm_pix_loss"] is True  # MAE's recipe by default

    merged, sidecar = load_backbone(out / "backbone")
    assert sidecar["objective"] == "mae" and sidecar["explora"]["rank"] == 4 and sidecar["gsd_m"] == 10.0
    trained, src = merged.state_dict(), source.state_dict()
    # Frozen block 0: every weight bit-identical, except the Q and V rows of qkv (LoRA merged in).
    d = TINY["embed_dim"]
    for key in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.attn.proj.weight"):
        assert torch.equal(trained[key], src[key]), key
    assert torch.equal(trained["blocks.0.attn.qkv.weight"][d:2 * d], src["blocks.0.attn.qkv.weight"][d:2 * d])
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"][:d], src["blocks.0.attn.qkv.weight"][:d])
    assert not torch.equal(trained["blocks.1.mlp.fc1.weight"], src["blocks.1.mlp.fc1.weight"])  # unfrozen
    adapter = load_file(out / "adapter.safetensors")
    assert "blocks.0.attn.qkv.lora_A.q" in adapter and "blocks.0.mlp.fc1.weight" not in adapter
    assert "blocks.1.mlp.fc1.weight" in adapter and "patch_embeds.0.proj.weight" in adapter


class Capture(L.Callback):
    """Keeps the module at the end of training."""

    module: Any = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = pl_module


def test_dinov2_loss_falls_and_teacher_shares_frozen_weights(t33uuu_dir: Path, tmp_path: Path) -> None:
    capture = Capture()
    summary = run_pretraining(tiny_config(t33uuu_dir, tmp_path / "run", "dinov2", max_steps=16),
                              callbacks=[capture], echo=quiet)
    assert summary is not None and falls(summary["loss_history"]), summary["loss_history"]
    assert summary["input_size"] == {"img_size": 32, "patch_size": 8, "global_crop_px": 32, "local_crop_px": 16}
    assert summary["source_weights_report"]["objective"]["mask_token"].startswith("new")
    objective = capture.module.objective
    student, teacher = objective.backbone, objective.teacher["backbone"]
    assert teacher.blocks[0].attn.qkv.weight is student.blocks[0].attn.qkv.weight
    assert teacher.blocks[0].mlp.fc1.weight is student.blocks[0].mlp.fc1.weight
    lora_s, lora_t = student.blocks[0].attn.qkv.lora_B["q"], teacher.blocks[0].attn.qkv.lora_B["q"]
    assert lora_s is not lora_t and not torch.equal(lora_s, lora_t)  # EMA lags the student
    assert lora_t.abs().sum() > 0  # ... but it moved


class StopAt(L.Callback):
    """Interrupts the run after optimiser step ``step`` (as a crash / pre-emption would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_reproduces_the_uninterrupted_losses(t33uuu_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(max_steps=8, checkpoint_every=2)
    full = run_pretraining(tiny_config(t33uuu_dir, tmp_path / "full", **kwargs), echo=quiet)
    part = tmp_path / "part"
    run_pretraining(tiny_config(t33uuu_dir, part, **kwargs), callbacks=[StopAt(5)], echo=quiet)
    ckpt = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    assert 4 <= ckpt["global_step"] < 8
    with pytest.raises(ExploraGeoError, match="already holds a run.*--resume"):
        run_pretraining(tiny_config(t33uuu_dir, part, **kwargs), echo=quiet)
    with pytest.raises(ExploraGeoError, match="other settings"):
        run_pretraining(tiny_config(t33uuu_dir, part, resume=True, **{**kwargs, "rank": 2}), echo=quiet)
    resumed = run_pretraining(tiny_config(t33uuu_dir, part, resume=True, **kwargs), echo=quiet)
    assert full is not None and resumed is not None and resumed["steps"] == 8
    assert [s for s, _ in resumed["loss_history"]] == list(range(8))
    assert torch.allclose(torch.tensor(resumed["loss_history"]), torch.tensor(full["loss_history"]), atol=1e-6)
    logs = sorted((part / "logs" / "csv").glob("version_*/metrics.csv"))
    assert len(logs) == 2 and logs[0].parent.name == "version_0"  # the first part's log is kept
    with pytest.raises(ExploraGeoError, match="contradict"):
        run_pretraining(tiny_config(t33uuu_dir, part, resume=True, overwrite=True, **kwargs), echo=quiet)
    # --overwrite starts afresh in the same folder: the same losses as the uninterrupted run, from step 0.
    again = run_pretraining(tiny_config(t33uuu_dir, part, overwrite=True, **kwargs), echo=quiet)
    assert again is not None and again["resumed_from"] is None
    assert torch.allclose(torch.tensor(again["loss_history"]), torch.tensor(full["loss_history"]), atol=1e-6)


class NaNData(L.LightningDataModule):
    def __init__(self, inner: L.LightningDataModule, index: int) -> None:
        super().__init__()
        self.inner, self.index = inner, index

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    def train_dataloader(self) -> Any:
        loader, index = self.inner.train_dataloader(), self.index

        class Poisoned:
            def __len__(self) -> int:
                return len(loader)

            def __iter__(self) -> Any:
                for i, batch in enumerate(loader):
                    if i == index:
                        batch["image"][0, 0, 0, 0] = float("nan")
                    yield batch

        return Poisoned()


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(t33uuu_dir: Path, tmp_path: Path) -> None:
    from explora_geo.data import PretrainDataModule
    from explora_geo.normalization import Normalization
    from explora_geo.sensors import get_sensor

    bands = get_sensor("sentinel2").model_bands
    inner = PretrainDataModule(str(t33uuu_dir), bands=bands, sensor="sentinel2", patch_size=32, batch_size=8,
                               samples_per_epoch=160, normalization=Normalization.for_sensor("sentinel2", bands))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step 5; .*last good checkpoint"):
        run_pretraining(tiny_config(t33uuu_dir, out, checkpoint_every=2), datamodule=NaNData(inner, 5), echo=quiet)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (out / "summary.json").exists() and not (out / "backbone.safetensors").exists()


@pytest.mark.parametrize("objective", ["dinov2", "mae"])
def test_plain_timm_vit_on_named_bands(t33uuu_dir: Path, tmp_path: Path, objective: str) -> None:
    """``bands`` as names -> a plain timm ViT on those bands (the D-[L]-r64 path, tiny)."""
    out = tmp_path / "rgb"
    config = tiny_config(t33uuu_dir, out, objective, bands="B04,B03,B02", model="vit_tiny_patch16_224",
                         model_kwargs=dict(embed_dim=32, depth=2, num_heads=2), patch_size=8, max_steps=3)
    summary = run_pretraining(config, echo=quiet)
    assert summary is not None and summary["steps"] == 3
    merged, sidecar = load_backbone(out / "backbone")
    assert sidecar["bands"] == ["B04", "B03", "B02"] and sidecar["architecture"] == "vit_tiny_patch16_224"
    assert sidecar["band_groups"] is None and merged.patch_embed.proj.weight.shape[1] == 3


def test_official_mae_file_gives_its_decoder_to_the_objective(t33uuu_dir: Path, tmp_path: Path) -> None:
    """A full MAE checkpoint (``{"model": encoder + decoder_* + mask_token}``, official names): the encoder
    loads into the backbone and the decoder into the MAE objective (frozen + LoRA)."""
    from explora_geo.objectives.mae import MAEDecoder

    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0, **TINY)
    decoder = MAEDecoder(32, 32, 1, 2, 8, [3])
    official = {"decoder_pos_embed": torch.zeros(1, 17, 32)}
    for key, value in decoder.state_dict().items():
        for ours, theirs in (("embed.", "decoder_embed."), ("blocks.", "decoder_blocks."),
                             ("norm.", "decoder_norm."), ("pred.0.", "decoder_pred."), ("mask_token", "mask_token")):
            if key.startswith(ours):
                official[theirs + key[len(ours):]] = value + 0.25
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": {**encoder.state_dict(), **official}}, path)
    capture = Capture()
    config = tiny_config(t33uuu_dir, tmp_path / "run", "mae", bands="B04,B03,B02", model="vit_tiny_patch16_224",
                         model_kwargs=TINY, patch_size=8, weights=str(path), max_steps=2,
                         mae=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, decoder_lora_rank=2))
    summary = run_pretraining(config, callbacks=[capture], echo=quiet)
    assert summary is not None and not summary["random_weights"]
    loaded = summary["source_weights_report"]  # what loading did, also in summary.json
    assert "blocks.0.attn.qkv.weight" in loaded["loaded_keys"] and loaded["new_keys"] == []
    assert sorted(loaded["extra"]) == sorted(official)
    objective = capture.module.objective
    assert "pred.0.weight" in objective.decoder_loaded and "blocks.0.attn.qkv.weight" in objective.decoder_loaded
    fc1 = objective.decoder.blocks[0].mlp.fc1.weight
    assert not fc1.requires_grad and torch.equal(fc1, official["decoder_blocks.0.mlp.fc1.weight"])
    assert torch.equal(objective.backbone.blocks[0].mlp.fc1.weight, encoder.blocks[0].mlp.fc1.weight)


def test_gradient_accumulation_counts_optimiser_steps(t33uuu_dir: Path, tmp_path: Path) -> None:
    summary = run_pretraining(tiny_config(t33uuu_dir, tmp_path / "acc", max_steps=3, accumulate=2, batch_size=4),
                              echo=quiet)
    assert summary is not None and summary["steps"] == 3 and summary["images_seen"] == 3 * 4 * 2
    assert [s for s, _ in summary["loss_history"]] == [0, 1, 2]


@pytest.mark.parametrize("objective", ["mae", "dinov2"])
def test_bf16_mixed_precision_runs(t33uuu_dir: Path, tmp_path: Path, objective: str) -> None:
    """The GPU default precision (bf16-mixed), exercised with CPU autocast: dtypes must line up."""
    summary = run_pretraining(tiny_config(t33uuu_dir, tmp_path / "bf16", objective, max_steps=2,
                                          precision="bf16-mixed"), echo=quiet)
    assert summary is not None and summary["precision"] == "bf16-mixed"
    assert all(torch.isfinite(torch.tensor(v)) for _, v in summary["loss_history"])


@pytest.mark.parametrize(("img_size", "global_px", "local_px"), [(None, 224, 98), (112, 112, 56)])
def test_dinov2_default_input_is_the_papers_224_and_98(tmp_path: Path, img_size, global_px, local_px) -> None:
    """A DINOv2 timm model (timm default 518 px) without --img-size trains on 224 px global / 98 px local
    crops, the paper's recipe; an explicit --img-size wins."""
    from explora_geo.training import ExploraPretrainTask
    from explora_geo.training.setup import echo_to
    from explora_geo.training.trainer import task_settings

    config = PretrainConfig.from_dict(dict(
        out=str(tmp_path / "run"), bands="B04,B03,B02", model="vit_small_patch14_dinov2", objective="dinov2",
        model_kwargs={"depth": 1}, weights="random", img_size=img_size, unfreeze="L", rank=2,
        dinov2=dict(head_hidden_dim=16, head_bottleneck_dim=8, num_prototypes=16)))
    with echo_to(quiet):
        task = ExploraPretrainTask(**task_settings(config))  # builds the model and the objective, no data
    assert task.model.patch_embed.img_size == (global_px, global_px)
    crops = task.weights_report["objective"]
    assert (crops["global_crop_px"], crops["local_crop_px"]) == (global_px, local_px)
    assert crops["solarize"] is True  # RGB input: DINOv2's solarisation on global crop 2

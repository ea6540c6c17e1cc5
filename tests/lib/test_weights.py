"""Source-weight loading from locally made files in the official formats (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from explora_geo.errors import ExploraGeoError
from explora_geo.models import GroupChannelViT, create_backbone, load_source_weights
from explora_geo.models.group_channel_vit import sincos_1d, sincos_2d
from explora_geo.models.weights import read_checkpoint_file, unwrap_state_dict

TINY = dict(embed_dim=32, depth=2, num_heads=2)
REPO = Path(__file__).resolve().parents[2]


def _vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=224, patch_size=16, num_classes=0, **TINY)
    args.update(kwargs)
    torch.manual_seed(len(str(sorted(args.items()))))
    return VisionTransformer(**args)


def _dinov2_official(reg_tokens: int = 0) -> dict[str, torch.Tensor]:
    """A DINOv2 ``*_pretrain.pth`` state dict: 518 px / patch 14 (37 x 37 grid + cls), LayerScale, mask_token."""
    src = _vit(img_size=518, patch_size=14, init_values=1e-5)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["mask_token"] = torch.randn(1, 32)
    sd["pos_embed"] = torch.randn(1, 1 + 37 * 37, 32)
    for k in sd:
        if k.endswith("ls1.gamma") or k.endswith("ls2.gamma"):
            sd[k] = torch.rand(32)  # distinguishable from the model's 1e-5 init
    if reg_tokens:
        sd["register_tokens"] = torch.randn(1, reg_tokens, 32)
    return sd


def _assert_same(model: torch.nn.Module, sd: dict[str, torch.Tensor], keys: list[str]) -> None:
    own = model.state_dict()
    for k in keys:
        assert torch.equal(own[k], sd[k]), k


# --------------------------------------------------------------------------------------------------------
# DINOv2 official files
# --------------------------------------------------------------------------------------------------------

def test_dinov2_official_pos_embed_resampled_like_bicubic_interpolate(tmp_path: Path) -> None:
    sd = _dinov2_official()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    model = create_backbone("vit_small_patch14_dinov2", img_size=224, init_values=1e-5, **TINY)
    report = load_source_weights(model, path)

    # independent computation: 37 x 37 grid -> 16 x 16, bicubic (antialiased, as timm resamples), cls kept
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    expect = torch.cat([sd["pos_embed"][:, :1], expect.permute(0, 2, 3, 1).reshape(1, 256, 32)], dim=1)
    torch.testing.assert_close(model.pos_embed.data, expect, rtol=1e-5, atol=1e-5)
    assert any(r.startswith("pos_embed (1, 1370, 32)->(1, 257, 32)") for r in report.resampled_keys)

    assert "blocks.0.ls1.gamma" in report.loaded_keys and "blocks.1.ls2.gamma" in report.loaded_keys
    _assert_same(model, sd, ["blocks.0.ls1.gamma", "blocks.1.attn.qkv.weight", "cls_token", "norm.weight",
                             "patch_embed.proj.weight"])
    assert set(report.extra) == {"mask_token"} and torch.equal(report.extra["mask_token"], sd["mask_token"])
    assert report.new_keys == [] and not report.random
    assert "mask_token" in report.summary() and "Loaded" in report.summary()
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["extra"] == {"mask_token": [1, 32]} and as_json["meta"] == {}


def test_dinov2_same_geometry_gives_source_outputs(tmp_path: Path) -> None:
    src = _vit(img_size=70, patch_size=14, init_values=1e-5).eval()
    sd = dict(src.state_dict(), mask_token=torch.zeros(1, 32))
    torch.save(sd, tmp_path / "d.pth")
    model = create_backbone("vit_small_patch14_dinov2", img_size=70, init_values=1e-5, **TINY).eval()
    load_source_weights(model, tmp_path / "d.pth")
    x = torch.randn(2, 3, 70, 70)
    torch.testing.assert_close(model(x), src(x))


def test_dinov2_registers_kept(tmp_path: Path) -> None:
    sd = _dinov2_official(reg_tokens=4)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = create_backbone("vit_small_patch14_reg4_dinov2", img_size=518, init_values=1e-5, **TINY)
    report = load_source_weights(model, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    assert torch.equal(model.reg_token.data, sd["register_tokens"])
    # timm's DINOv2 conversion: the cls position is folded into the cls token, pos_embed has no prefix entry
    torch.testing.assert_close(model.cls_token.data, sd["cls_token"] + sd["pos_embed"][:, :1])
    assert torch.equal(model.pos_embed.data, sd["pos_embed"][:, 1:])
    assert "reg_token" in report.loaded_keys


def test_dinov2_into_group_channel_keeps_registers_when_asked(tmp_path: Path) -> None:
    sd = _dinov2_official(reg_tokens=4)
    torch.save(sd, tmp_path / "reg.pth")
    with_regs = GroupChannelViT(reg_tokens=4, init_values=1e-5, **TINY)
    report = load_source_weights(with_regs, tmp_path / "reg.pth")
    assert torch.equal(with_regs.reg_token.data, sd["register_tokens"]) and "reg_token" in report.loaded_keys
    without = GroupChannelViT(init_values=1e-5, **TINY)
    report = load_source_weights(without, tmp_path / "reg.pth")
    assert "reg_token" in report.ignored_keys


# --------------------------------------------------------------------------------------------------------
# MAE official files
# --------------------------------------------------------------------------------------------------------

def _mae_official(with_decoder: bool) -> dict:
    enc = {k: v.clone() for k, v in _vit().state_dict().items()}
    if with_decoder:
        enc.update({
            "mask_token": torch.randn(1, 1, 16),
            "decoder_embed.weight": torch.randn(16, 32), "decoder_embed.bias": torch.randn(16),
            "decoder_pos_embed": torch.randn(1, 197, 16),
            "decoder_blocks.0.norm1.weight": torch.randn(16),
            "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
            "decoder_norm.weight": torch.randn(16), "decoder_pred.weight": torch.randn(768, 16),
            "decoder_pred.bias": torch.randn(768),
        })
    return {"model": enc, "epoch": 799, "args": "Namespace(...)"}


@pytest.mark.parametrize("with_decoder", [True, False])
def test_mae_official(tmp_path: Path, with_decoder: bool) -> None:
    ckpt = _mae_official(with_decoder)
    torch.save(ckpt, tmp_path / "mae_pretrain_vit.pth")
    model = create_backbone("vit_large_patch16_224", **TINY)
    report = load_source_weights(model, tmp_path / "mae_pretrain_vit.pth")
    _assert_same(model, ckpt["model"], ["blocks.1.mlp.fc2.weight", "pos_embed", "cls_token", "norm.bias"])
    decoder = {k for k in ckpt["model"] if k.startswith("decoder_") or k == "mask_token"}
    assert set(report.extra) == decoder
    for k in decoder:
        assert torch.equal(report.extra[k], ckpt["model"][k])
    assert not any(k.startswith("decoder") for k in model.state_dict())


def test_mae_into_avg_pool_model_uses_fresh_fc_norm(tmp_path: Path) -> None:
    torch.save(_mae_official(False), tmp_path / "mae.pth")
    model = create_backbone("vit_large_patch16_224", global_pool="avg", num_classes=3, **TINY)
    report = load_source_weights(model, tmp_path / "mae.pth")
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} == set(report.new_keys)
    assert "norm.weight" in report.ignored_keys


# --------------------------------------------------------------------------------------------------------
# Local files: containers, prefixes, safetensors, our backbone files
# --------------------------------------------------------------------------------------------------------

def test_lightning_teacher_and_safetensors_files(tmp_path: Path) -> None:
    sd = _vit().state_dict()
    lightning = {"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}
                 | {"model.head.mlp.weight": torch.randn(4, 32)}, "hyper_parameters": {"lr": 1e-3}}
    torch.save(lightning, tmp_path / "epoch=3.ckpt")
    dino = {"teacher": {f"backbone.{k}": v for k, v in sd.items()}
            | {"head.last_layer.weight": torch.randn(8, 32)},
            "student": {f"backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}}
    torch.save(dino, tmp_path / "checkpoint.pth")
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "plain.bin")
    for name in ("epoch=3.ckpt", "checkpoint.pth", "w.safetensors", "plain.bin"):
        model = create_backbone("vit_base_patch16_224", **TINY)
        report = load_source_weights(model, tmp_path / name)
        _assert_same(model, sd, list(sd))
        assert sorted(report.loaded_keys) == sorted(sd), name
    # the head of the Lightning module is reported, not loaded
    model = create_backbone("vit_base_patch16_224", **TINY)
    assert "model.head.mlp.weight" in load_source_weights(model, tmp_path / "epoch=3.ckpt").ignored_keys


def test_unwrap_prefers_teacher_backbone() -> None:
    t = {"blocks.0.norm1.weight": torch.ones(2)}
    raw = {"model": {**{f"student.backbone.{k}": v * 0 for k, v in t.items()},
                     **{f"teacher.backbone.{k}": v for k, v in t.items()}}}
    sd, ignored = unwrap_state_dict(raw)
    assert torch.equal(sd["blocks.0.norm1.weight"], torch.ones(2))
    assert ignored == ["student.backbone.blocks.0.norm1.weight"]


def test_explora_geo_backbone_files_roundtrip(tmp_path: Path) -> None:
    from explora_geo.checkpoint import save_backbone

    src = timm.create_model("group_channel_vit_tiny_patch8_96", **TINY)
    with torch.no_grad():
        src.pos_embed.add_(1.0)
        src.group_embed.mul_(3.0)
    save_backbone(src, tmp_path / "bb", {"model_kwargs": TINY, "sensor": "sentinel2"})
    model = timm.create_model("group_channel_vit_tiny_patch8_96", num_classes=4, **TINY)
    report = load_source_weights(model, tmp_path / "bb.safetensors")
    _assert_same(model, src.state_dict(), list(src.state_dict()))
    assert set(report.new_keys) == {"head.weight", "head.bias"}
    assert report.meta["bands"] == src.band_names and report.meta["sidecar"]["architecture"].startswith("group")
    other = timm.create_model("group_channel_vit_tiny_patch8_96", band_groups=[["B02", "B03", "B04"],
                              ["B05", "B06", "B07", "B8A"], ["B11", "B12", "B08"]], **TINY)
    with pytest.raises(ExploraGeoError, match="trained on bands"):
        load_source_weights(other, tmp_path / "bb.safetensors")


def test_random_is_loud() -> None:
    model = GroupChannelViT(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_source_weights(model, "random")
    assert report.random and report.loaded_keys == [] and "RANDOM" in report.summary()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------------
# Strictness and errors
# --------------------------------------------------------------------------------------------------------

def test_misshaped_block_key_names_key_and_shapes(tmp_path: Path) -> None:
    sd = _vit().state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.randn(90, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ExploraGeoError, match=r"blocks\.1\.attn\.qkv\.weight .*\(90, 32\).*\(96, 32\)") as err:
        load_source_weights(create_backbone("vit_base_patch16_224", **TINY), tmp_path / "bad.pth")
    assert "\n" not in str(err.value) and "another architecture" in str(err.value)


def test_missing_block_key_and_deeper_checkpoint(tmp_path: Path) -> None:
    sd = _vit().state_dict()
    del sd["blocks.1.norm2.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ExploraGeoError, match=r"lacks blocks\.1\.norm2\.weight \(model shape \(32,\)"):
        load_source_weights(create_backbone("vit_base_patch16_224", **TINY), tmp_path / "missing.pth")
    torch.save(_vit(depth=3).state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ExploraGeoError, match=r"blocks\.2\..* has no place"):
        load_source_weights(create_backbone("vit_base_patch16_224", **TINY), tmp_path / "deeper.pth")
    with pytest.raises(ExploraGeoError, match=r"blocks\.2\..* has no place"):
        load_source_weights(GroupChannelViT(**TINY), tmp_path / "deeper.pth")


@pytest.mark.parametrize("name", ["corrupt.pth", "corrupt.safetensors"])
def test_corrupt_file_named(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    good = tmp_path / ("good" + path.suffix)
    if path.suffix == ".pth":
        torch.save(_vit().state_dict(), good)
    else:
        save_file({k: v.contiguous() for k, v in _vit().state_dict().items()}, str(good))
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ExploraGeoError, match=rf"cannot read weights file .*{name}") as err:
        read_checkpoint_file(path)
    assert "\n" not in str(err.value)


def test_bad_specs() -> None:
    model = GroupChannelViT(**TINY)
    with pytest.raises(ExploraGeoError, match=r"weights file /nonexistent/w\.pth does not exist"):
        load_source_weights(model, "/nonexistent/w.pth")
    with pytest.raises(ExploraGeoError, match=r"did you mean .*vit_large_patch14_dinov2\.lvd142m"):
        load_source_weights(model, "vit_large_patch14_dinov2.lvd124m")
    with pytest.raises(ExploraGeoError, match="torchgeo has no weights"):
        load_source_weights(model, "ViTSmall16_Weights.NOPE")


def test_not_a_vit_file(tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(ExploraGeoError, match="not a ViT checkpoint"):
        load_source_weights(GroupChannelViT(**TINY), tmp_path / "resnet.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ExploraGeoError, match="not a state dict"):
        load_source_weights(GroupChannelViT(**TINY), tmp_path / "list.pth")


def test_head_of_other_task_is_replaced(tmp_path: Path) -> None:
    src = _vit(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "in1k.pth")
    model = create_backbone("vit_base_patch16_224", num_classes=5, **TINY)
    report = load_source_weights(model, tmp_path / "in1k.pth")
    assert {"head.weight", "head.bias"} == set(report.new_keys) and "head.weight" in report.ignored_keys
    same = create_backbone("vit_base_patch16_224", num_classes=1000, **TINY)
    assert "head.weight" in load_source_weights(same, tmp_path / "in1k.pth").loaded_keys


# --------------------------------------------------------------------------------------------------------
# RGB -> group-channel
# --------------------------------------------------------------------------------------------------------

def test_rgb_source_into_group_channel(tmp_path: Path) -> None:
    sd = _dinov2_official()
    torch.save(sd, tmp_path / "dinov2.pth")
    model = GroupChannelViT(init_values=1e-5, **TINY)  # S2 groups, patch 8
    fresh_pos, fresh_group = model.pos_embed.detach().clone(), model.group_embed.detach().clone()
    report = load_source_weights(model, tmp_path / "dinov2.pth")

    kernel = resample_patch_embed(sd["patch_embed.proj.weight"], [8, 8])  # 14 -> 8 px kernels
    g0 = model.patch_embeds[0].proj.weight.data  # B02, B03, B04, B08
    torch.testing.assert_close(g0[:, 2], kernel[:, 0])  # B04 = red = RGB channel 0
    torch.testing.assert_close(g0[:, 1], kernel[:, 1])  # B03 = green
    torch.testing.assert_close(g0[:, 0], kernel[:, 2])  # B02 = blue
    torch.testing.assert_close(g0[:, 3], kernel.mean(1) / 4)  # B08: mean RGB kernel / group size
    others = (kernel.mean(1) / 4)[:, None].expand(-1, 4, -1, -1)
    torch.testing.assert_close(model.patch_embeds[1].proj.weight.data, others)
    torch.testing.assert_close(model.patch_embeds[2].proj.weight.data[:, 1], kernel.mean(1) / 2)
    for g in range(3):
        assert torch.equal(model.patch_embeds[g].proj.bias.data, sd["patch_embed.proj.bias"])
    _assert_same(model, sd, ["blocks.0.attn.qkv.weight", "blocks.1.ls2.gamma", "norm.weight"])
    torch.testing.assert_close(model.cls_token.data, sd["cls_token"] + sd["pos_embed"][:, :1])
    # position / group encodings stay the group-channel sin-cos ones
    assert torch.equal(model.pos_embed.data, fresh_pos) and torch.equal(model.group_embed.data, fresh_group)
    torch.testing.assert_close(model.pos_embed.data[0], sincos_2d(24, (12, 12)))
    torch.testing.assert_close(model.group_embed.data[0], sincos_1d(8, torch.arange(3)))
    assert {"pos_embed", "group_embed"} <= set(report.new_keys)
    assert "patch_embeds.0.proj.weight" in report.loaded_keys and "blocks.0.ls1.gamma" in report.loaded_keys
    assert any("(32, 3, 14, 14)->(32, 3, 8, 8)" in r for r in report.resampled_keys)
    assert any("B04<-ch0" in n and "B08<-mean/4" in n for n in report.notes)
    assert set(report.extra) == {"mask_token"}
    assert model(torch.randn(1, 10, 96, 96)).shape == (1, 32)


def test_rgb_init_random_others_and_same_patch_size(tmp_path: Path) -> None:
    src = _vit(img_size=96, patch_size=8)
    torch.save(src.state_dict(), tmp_path / "rgb8.pth")
    model = GroupChannelViT(**TINY)
    fresh = [e.proj.weight.detach().clone() for e in model.patch_embeds]
    load_source_weights(model, tmp_path / "rgb8.pth", other_kernels="random")
    w = src.patch_embed.proj.weight.data
    g0 = model.patch_embeds[0].proj.weight.data
    assert torch.equal(g0[:, 2], w[:, 0]) and torch.equal(g0[:, 1], w[:, 1]) and torch.equal(g0[:, 0], w[:, 2])
    assert torch.equal(g0[:, 3], fresh[0][:, 3])  # B08 keeps its fresh kernel
    assert torch.equal(model.patch_embeds[1].proj.weight.data, fresh[1])
    # custom RGB naming for a non-S2 model
    rgbn = GroupChannelViT(band_groups=[["blue", "green", "red"], ["nir"]], sensor=None, **TINY)
    load_source_weights(rgbn, tmp_path / "rgb8.pth", rgb_bands=["red", "green", "blue"])
    assert torch.equal(rgbn.patch_embeds[0].proj.weight.data[:, 2], w[:, 0])


def test_rgb_source_into_multispectral_timm_vit(tmp_path: Path) -> None:
    src = _vit()
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    model = create_backbone("vit_base_patch16_224", bands="sentinel2", **TINY)
    report = load_source_weights(model, tmp_path / "rgb.pth")
    w, got = src.patch_embed.proj.weight.data, model.patch_embed.proj.weight.data
    assert model.band_names.index("B04") == 2 and torch.equal(got[:, 2], w[:, 0])
    assert torch.equal(got[:, 0], w[:, 2])
    torch.testing.assert_close(got[:, 3], w.mean(1) / 10)
    assert any("by band name" in r for r in report.resampled_keys)


# --------------------------------------------------------------------------------------------------------
# Hub caches: timm names through the Hugging Face cache, torchgeo names through torch.hub's
# --------------------------------------------------------------------------------------------------------

def test_timm_name_from_offline_hf_cache(tmp_path: Path) -> None:
    """The real resolution path (timm pretrained cfg -> huggingface_hub cache) in a fresh offline process."""
    name = "vit_small_patch14_dinov2.lvd142m"
    src = timm.create_model("vit_small_patch14_dinov2", depth=1)  # real width (384), one block, 518 px
    repo = tmp_path / "hf" / "hub" / f"models--timm--{name}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    weights = repo / "snapshots" / rev / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from explora_geo.errors import ExploraGeoError
        from explora_geo.models import create_backbone, load_source_weights
        m = create_backbone("{name}", img_size=224, depth=1)
        r = load_source_weights(m, "{name}")
        sd = load_file(r"{weights}")
        assert torch.equal(m.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
        assert m.pos_embed.shape == (1, 257, 384), m.pos_embed.shape
        print("SOURCE", r.source)
        print("NORM", r.meta["normalization"]["mean"])
        try:
            other = create_backbone("vit_base_patch14_dinov2", depth=1)
            load_source_weights(other, "vit_base_patch14_dinov2.lvd142m")
        except ExploraGeoError as err:
            print("ERROR", err)
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert f"hf-hub cache timm/{name}/model.safetensors" in lines["SOURCE"]
    assert lines["NORM"].startswith("[0.485")
    assert "--weights PATH" in lines["ERROR"] and "--weights random" in lines["ERROR"]


def test_torchgeo_name_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchgeo.models import get_weight

    name = "ViTSmall16_Weights.SENTINEL2_ALL_DINO"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExploraGeoError, match=r"not cached at .*checkpoints.*--weights PATH"):
        load_source_weights(GroupChannelViT(**TINY), name)

    # the torchgeo file: a timm vit_small_patch16_224 state dict with 13 input channels (B1..B12, B8a)
    src = timm.create_model("vit_small_patch16_224", in_chans=13, num_classes=0, depth=1)
    url = get_weight(name).url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(url))
    model = timm.create_model("group_channel_vit_small_patch16_224", depth=1)
    report = load_source_weights(model, name)
    assert report.meta["bands"][:2] == ["B1", "B2"] and report.meta["in_chans"] == 13
    assert report.meta["normalization"] == {"mean": [0.0], "std": [10000.0]}
    w = src.patch_embed.proj.weight.data
    g0, g1, g2 = (e.proj.weight.data for e in model.patch_embeds)
    assert torch.equal(g0[:, 0], w[:, 1]) and torch.equal(g0[:, 3], w[:, 7])  # B02 <- B2, B08 <- B8
    assert torch.equal(g1[:, 3], w[:, 8])  # B8A <- B8a (channel 8 of the L1C order)
    assert torch.equal(g2[:, 0], w[:, 11]) and torch.equal(g2[:, 1], w[:, 12])  # B11, B12
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert report.source == f"torchgeo {name}"
    json.dumps({k: v for k, v in report.meta.items()})  # meta is JSON-ready


def test_timm_vit_with_reordered_rgb_bands(tmp_path: Path) -> None:
    src = _vit()
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    w = src.patch_embed.proj.weight.data
    bgr = create_backbone("vit_base_patch16_224", bands=["B02", "B03", "B04"], **TINY)
    load_source_weights(bgr, tmp_path / "rgb.pth")
    assert torch.equal(bgr.patch_embed.proj.weight.data, w.flip(1))  # blue first: channels reversed
    rgb = create_backbone("vit_base_patch16_224", **TINY)  # default bands R, G, B: loaded as is
    report = load_source_weights(rgb, tmp_path / "rgb.pth")
    assert torch.equal(rgb.patch_embed.proj.weight.data, w) and report.resampled_keys == []


def test_folder_and_prenorm_sources(tmp_path: Path) -> None:
    with pytest.raises(ExploraGeoError, match="is a folder"):
        load_source_weights(GroupChannelViT(**TINY), tmp_path)
    torch.save(_vit(pre_norm=True).state_dict(), tmp_path / "clip.pth")
    with pytest.raises(ExploraGeoError, match=r"norm_pre\.\w+ \(a pre-norm"):
        load_source_weights(GroupChannelViT(**TINY), tmp_path / "clip.pth")


def test_img_size_resamples_to_requested_grid(tmp_path: Path) -> None:
    torch.save(_dinov2_official(), tmp_path / "d.pth")
    vit = create_backbone("vit_small_patch14_dinov2", img_size=224, init_values=1e-5, **TINY)
    load_source_weights(vit, tmp_path / "d.pth", img_size=112)
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert vit(torch.randn(1, 3, 112, 112)).shape == (1, 32)
    gc = GroupChannelViT(init_values=1e-5, **TINY)
    load_source_weights(gc, tmp_path / "d.pth", img_size=64)
    assert gc.grid_size == (8, 8) and gc.pos_embed.shape == (1, 64, 24)


def test_layer_scale_folded_or_set_to_one_exactly(tmp_path: Path) -> None:
    """A LayerScale source into a model without it (and the reverse) computes the same function."""
    src = _vit(img_size=70, patch_size=14, init_values=1e-5).eval()
    with torch.no_grad():
        for blk in src.blocks:
            blk.ls1.gamma.uniform_(0.1, 2.0)
            blk.ls2.gamma.uniform_(0.1, 2.0)
    torch.save(dict(src.state_dict(), mask_token=torch.zeros(1, 32)), tmp_path / "ls.pth")
    plain = create_backbone("vit_small_patch16_224", patch_size=14, img_size=70, **TINY).eval()
    report = load_source_weights(plain, tmp_path / "ls.pth")
    assert "blocks.0.ls1.gamma" not in plain.state_dict() and any("folded" in n for n in report.notes)
    x = torch.randn(2, 3, 70, 70)
    torch.testing.assert_close(plain(x), src(x), rtol=1e-4, atol=1e-5)
    # group-channel ViT without LayerScale from a DINOv2 file (the CLI default pairing)
    gc = timm.create_model("group_channel_vit_tiny_patch8_96", **TINY)
    load_source_weights(gc, tmp_path / "ls.pth")
    torch.testing.assert_close(gc.blocks[1].mlp.fc2.weight.data,
                               src.blocks[1].ls2.gamma.data[:, None] * src.blocks[1].mlp.fc2.weight.data)

    no_ls = _vit(img_size=70, patch_size=14).eval()
    torch.save(no_ls.state_dict(), tmp_path / "plain.pth")
    with_ls = create_backbone("vit_small_patch14_dinov2", img_size=70, init_values=1e-5, **TINY).eval()
    report = load_source_weights(with_ls, tmp_path / "plain.pth")
    assert torch.equal(with_ls.blocks[0].ls1.gamma.data, torch.ones(32))
    assert "blocks.0.ls2.gamma" in report.loaded_keys
    torch.testing.assert_close(with_ls(x), no_ls(x))


def test_public_import_paths_survive_the_split() -> None:
    """``explora_geo.models.weights`` is a package (one module per source format); its public names still
    import from the package itself."""
    from explora_geo.models import weights

    for name in ("LoadReport", "SourceCheckpoint", "load_source_weights", "resolve_source", "read_checkpoint_file",
                 "unwrap_state_dict", "split_extra", "band_kernels", "infer_sensor", "match_layer_scale",
                 "rgb_to_group_kernels"):
        assert callable(getattr(weights, name)), name
    from explora_geo.models import LoadReport, load_source_weights

    assert LoadReport is weights.LoadReport and load_source_weights is weights.load_source_weights


def test_official_dinov2_mask_token_reaches_the_ibot_objective(tmp_path: Path) -> None:
    """The official file's mask_token (which timm's DINOv2 conversion drops) starts the objective's iBOT mask
    token, and the objective's report says where it came from; without one it is reported new."""
    from explora_geo.adapter import ExploraConfig, apply_explora
    from explora_geo.training.setup import build_objective

    sd = _dinov2_official()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    model = _vit(img_size=56, patch_size=14, dynamic_img_size=True)
    report = load_source_weights(model, str(path))
    apply_explora(model, ExploraConfig(unfreeze="L", rank=2))
    settings = dict(head_hidden_dim=16, head_bottleneck_dim=8, num_prototypes=16)
    objective = build_objective("dinov2", model, settings, report.extra, report.source)
    assert torch.equal(objective.mask_token.detach(), sd["mask_token"])
    assert objective.report()["mask_token"] == f"loaded from {path}"
    fresh = apply_explora(_vit(img_size=56, patch_size=14, dynamic_img_size=True), ExploraConfig(rank=2))
    assert build_objective("dinov2", fresh, settings).report()["mask_token"].startswith("new (zeros)")

"""Group-channel ViT: shapes, timm integration, band-order invariance, encodings (tiny models)."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from explora_geo.errors import ExploraGeoError
from explora_geo.models import GroupChannelViT, create_backbone, is_group_channel
from explora_geo.models.group_channel_vit import group_embed_dim_for
from explora_geo.models.pos_embed import sincos_1d, sincos_2d
from explora_geo.sensors import get_sensor

TINY = dict(embed_dim=32, depth=2, num_heads=2)
S2_BANDS = get_sensor("sentinel2").model_bands


@pytest.fixture(scope="module")
def model() -> GroupChannelViT:
    torch.manual_seed(0)
    return timm.create_model("group_channel_vit_tiny_patch8_96", **TINY).eval()


def test_create_model_with_in_chans_and_num_classes() -> None:
    m = timm.create_model("group_channel_vit_tiny_patch8_96", in_chans=10, num_classes=5, **TINY)
    assert isinstance(m, GroupChannelViT)
    assert m.band_names == S2_BANDS
    assert m.band_groups == [list(g) for g in get_sensor("sentinel2").model_groups]
    assert m(torch.randn(2, 10, 96, 96)).shape == (2, 5)
    assert m.pretrained_cfg["architecture"] == "group_channel_vit_tiny_patch8_96"
    assert m.default_cfg is m.pretrained_cfg or m.default_cfg == m.pretrained_cfg


def test_in_chans_must_match_bands() -> None:
    with pytest.raises(ExploraGeoError, match=r"in_chans=3 .* 10 bands"):
        timm.create_model("group_channel_vit_tiny_patch8_96", in_chans=3, **TINY)
    groups = [["B02", "B03", "B04"], ["B08"]]
    m = timm.create_model("group_channel_vit_tiny_patch8_96", band_groups=groups, **TINY)
    assert m.in_chans == 4 and len(m.patch_embeds) == 2
    m = timm.create_model("group_channel_vit_tiny_patch8_96", sensor="landsat8", **TINY)
    assert m.band_names == ["B2", "B3", "B4", "B5", "B6", "B7"]


@pytest.mark.parametrize("bad", [[["B02"], []], [["B02", "B03"], ["B03"]], ["B02", "B03"]])
def test_bad_band_groups(bad: list) -> None:
    with pytest.raises(ExploraGeoError):
        GroupChannelViT(band_groups=bad, **TINY)


def test_token_layout_and_shapes(model: GroupChannelViT) -> None:
    x = torch.randn(2, 10, 96, 96)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 3 * 144, 32)  # 96 px / patch 8 -> 12 x 12 = 144 per group
    assert model.pos_embed.shape == (1, 144, 32 - 8)
    assert model.group_embed.shape == (1, 3, 8)
    assert model.num_prefix_tokens == 1 and model.num_features == model.embed_dim == 32
    assert model.forward_head(feats).shape == (2, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
    assert model(x).shape == (2, 32)


def test_tokens_are_patch_plus_pos_and_group_code(model: GroupChannelViT) -> None:
    x = torch.randn(1, 10, 96, 96)
    tokens, grid = model.embed_tokens(x)
    assert grid == (12, 12) and tokens.shape == (1, 432, 32)
    # group 1 (B05, B06, B07, B8A), patch l = 5: projection of that patch + concat(pos[5], group[1])
    patch = x[:, 4:8, 0:8, 40:48]
    proj = model.patch_embeds[1].proj
    expected = F.conv2d(patch, proj.weight, proj.bias).flatten()
    expected = expected + torch.cat([model.pos_embed[0, 5], model.group_embed[0, 1]])
    torch.testing.assert_close(tokens[0, 144 + 5], expected, rtol=1e-5, atol=1e-5)


def test_band_order_invariance(model: GroupChannelViT) -> None:
    """Acceptance item 4: permuted input bands selected by name give identical output."""
    torch.manual_seed(1)
    x = torch.randn(2, 10, 96, 96)
    ref = model.forward_features(x)
    perm = torch.randperm(10)
    names = [S2_BANDS[i] for i in perm]
    out = model.forward_features(model.select_input_bands(x[:, perm], names))
    assert torch.equal(out, ref)
    # extra bands and aliases are fine: 13-band L1C order with B8A after B08, lower-case alias names
    l1c = get_sensor("sentinel2").band_names
    full = torch.randn(2, 13, 96, 96)
    idx = [l1c.index(b) for b in S2_BANDS]
    full[:, idx] = x
    aliases = [b.lower().replace("b0", "b") for b in l1c]
    assert torch.equal(model(model.select_input_bands(full, aliases)), model(x))
    # a wrong order is not silently accepted as the same input
    assert not torch.allclose(model.forward_features(x[:, perm]), ref)


def test_band_errors(model: GroupChannelViT) -> None:
    with pytest.raises(ExploraGeoError, match="lacks band"):
        model.select_input_bands(torch.randn(1, 2, 96, 96), ["B02", "B03"])
    with pytest.raises(ExploraGeoError, match="expects 10"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ExploraGeoError, match="one name per channel"):
        model.select_input_bands(torch.randn(1, 10, 96, 96), S2_BANDS[:5])


def test_dynamic_image_size(model: GroupChannelViT) -> None:
    out = model.forward_features(torch.randn(1, 10, 64, 80))
    assert out.shape == (1, 1 + 3 * 8 * 10, 32)
    pos = model.pos_embed_for((8, 10))
    assert pos.shape == (1, 80, 24)
    # same grid as built: the learnable parameter itself
    assert model.pos_embed_for((12, 12)) is model.pos_embed


def test_set_input_size_resamples_pos_embed() -> None:
    m = GroupChannelViT(img_size=96, patch_size=8, **TINY)
    m.set_input_size(128)
    assert m.grid_size == (16, 16) and m.pos_embed.shape == (1, 256, 24)
    assert m.forward_features(torch.randn(1, 10, 128, 128)).shape == (1, 1 + 3 * 256, 32)
    m.set_input_size(patch_size=16)
    assert m.patch_size == (16, 16) and m.grid_size == (8, 8) and m.pos_embed.shape == (1, 64, 24)
    assert m.patch_embeds[2].proj.weight.shape == (32, 2, 16, 16)
    assert m.forward_features(torch.randn(1, 10, 128, 128)).shape == (1, 1 + 3 * 64, 32)


def test_forward_intermediates(model: GroupChannelViT) -> None:
    x = torch.randn(2, 10, 96, 96)
    final, inter = model.forward_intermediates(x)
    assert final.shape == (2, 433, 32) and len(inter) == 2
    assert all(t.shape == (2, 32, 12, 12) for t in inter)
    nlc = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (2, 432, 32)
    # NCHW (mean) is the per-group grid averaged over groups
    grid = nlc[0].reshape(2, 3, 12, 12, 32).mean(1).permute(0, 3, 1, 2)
    torch.testing.assert_close(inter[1], grid)
    cat = model.forward_intermediates(x, indices=1, intermediates_only=True, group_reduce="concat")
    assert cat[0].shape == (2, 96, 12, 12)
    # the last block's normed output equals forward_features
    normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True,
                                         return_prefix_tokens=True)
    tokens, prefix = normed[0]
    torch.testing.assert_close(torch.cat([prefix, tokens], 1), model.forward_features(x))
    d = model.forward_intermediates(x, indices=1, output_dict=True, return_prefix_tokens=True)
    assert set(d) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    layers = model.get_intermediate_layers(x, n=2, reshape=True)
    assert len(layers) == 2 and layers[0].shape == (2, 32, 12, 12)
    with pytest.raises(ExploraGeoError):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_features_only_and_pool_modes() -> None:
    fm = timm.create_model("group_channel_vit_tiny_patch8_96", features_only=True, out_indices=(0, 1), **TINY)
    outs = fm(torch.randn(1, 10, 96, 96))
    assert [o.shape for o in outs] == [(1, 32, 12, 12)] * 2
    avg = GroupChannelViT(global_pool="avg", num_classes=3, **TINY)
    feats = avg.forward_features(torch.randn(1, 10, 96, 96))
    pooled = avg.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, avg.fc_norm(feats[:, 1:].mean(1)))
    assert avg(torch.randn(1, 10, 96, 96)).shape == (1, 3)


def test_reset_classifier_and_helpers(model: GroupChannelViT) -> None:
    m = GroupChannelViT(**TINY)
    m.reset_classifier(7, global_pool="avg")
    assert m.global_pool == "avg" and m(torch.randn(1, 10, 96, 96)).shape == (1, 7)
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), torch.nn.Identity)
    assert {"pos_embed", "group_embed", "cls_token"} <= model.no_weight_decay()
    matcher = model.group_matcher()
    assert "patch_embeds" in matcher["stem"] and "group_embed" in matcher["stem"]
    names = {n for n, _ in model.named_parameters()}
    for expected in ("cls_token", "pos_embed", "group_embed", "patch_embeds.0.proj.weight",
                     "blocks.0.attn.qkv.weight", "blocks.1.norm1.weight", "blocks.1.norm2.bias", "norm.weight"):
        assert expected in names


def test_layer_scale_and_registers() -> None:
    m = GroupChannelViT(init_values=1e-5, reg_tokens=4, **TINY)
    assert "blocks.0.ls1.gamma" in m.state_dict() and m.reg_token.shape == (1, 4, 32)
    assert m.num_prefix_tokens == 5
    assert m.forward_features(torch.randn(1, 10, 96, 96)).shape == (1, 5 + 432, 32)
    avg = GroupChannelViT(reg_tokens=4, global_pool="avg", **TINY)
    feats = avg.forward_features(torch.randn(1, 10, 96, 96))
    torch.testing.assert_close(avg.forward_head(feats, pre_logits=True), avg.fc_norm(feats[:, 5:].mean(1)))


def test_sincos_encodings() -> None:
    enc = sincos_1d(8, torch.tensor([0.0, 1.0, 3.0]))
    assert enc.shape == (3, 8)
    assert torch.equal(enc[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert math.isclose(enc[2, 1].item(), math.sin(3 * 10000 ** (-1 / 4)), rel_tol=1e-6)
    grid = sincos_2d(16, (2, 3))
    assert grid.shape == (6, 16)
    # token (i=1, j=2) -> l = 5: first half encodes the column, second the row
    torch.testing.assert_close(grid[5], torch.cat([sincos_1d(8, torch.tensor([2.0]))[0],
                                                   sincos_1d(8, torch.tensor([1.0]))[0]]))
    m = GroupChannelViT(**TINY)
    torch.testing.assert_close(m.pos_embed[0], sincos_2d(24, (12, 12)))
    torch.testing.assert_close(m.group_embed[0], sincos_1d(8, torch.arange(3)))
    assert m.pos_embed.requires_grad and m.group_embed.requires_grad
    assert group_embed_dim_for(1024) == 256 and group_embed_dim_for(768) == 256 and group_embed_dim_for(384) == 96


def test_registered_variants_geometry() -> None:
    names = timm.list_models("group_channel_vit_*")
    assert {f"group_channel_vit_{s}_{g}" for s in ("tiny", "small", "base", "large")
            for g in ("patch8_96", "patch16_224")} <= set(names)
    with torch.device("meta"):
        large = timm.create_model("group_channel_vit_large_patch8_96")
        base224 = timm.create_model("group_channel_vit_base_patch16_224")
    assert (large.embed_dim, len(large.blocks), large.pos_embed.shape) == (1024, 24, (1, 144, 768))
    assert large.group_embed.shape == (1, 3, 256)
    assert base224.pos_embed.shape == (1, 196, 512) and base224.patch_size == (16, 16)


def test_create_backbone() -> None:
    gc = create_backbone("group_channel_vit_tiny_patch8_96", bands=[["B04", "B03"], ["B08"]], **TINY)
    assert isinstance(gc, GroupChannelViT) and gc.band_names == ["B04", "B03", "B08"]
    assert is_group_channel(gc) and is_group_channel("group_channel_vit_base_patch16_224")
    one = create_backbone("group_channel_vit_tiny_patch8_96", bands=["B02", "B03"], img_size=64, **TINY)
    assert one.band_groups == [["B02", "B03"]] and one.img_size == (64, 64)
    vit = create_backbone("vit_small_patch14_dinov2.lvd142m", img_size=56, num_classes=4, depth=1)
    assert vit.band_names == ["R", "G", "B"] and vit(torch.randn(1, 3, 56, 56)).shape == (1, 4)
    ms = create_backbone("vit_tiny_patch16_224", bands="sentinel2", depth=1)
    assert ms.patch_embed.proj.in_channels == 10 and ms.band_names == S2_BANDS
    with pytest.raises(ExploraGeoError, match="did you mean .*vit_small_patch14_dinov2"):
        create_backbone("vit_smal_patch14_dinov2")
    with pytest.raises(ExploraGeoError, match="unknown sensor"):
        create_backbone("group_channel_vit_tiny_patch8_96", bands="sentinel3")
    with pytest.raises(ExploraGeoError, match="in_chans=3"):
        create_backbone("vit_tiny_patch16_224", bands="sentinel2", in_chans=3)


def test_torchgeo_classification_builds_it() -> None:
    from torchgeo.tasks import Classification

    task = Classification(model="group_channel_vit_tiny_patch8_96", in_channels=10, num_classes=3)
    assert isinstance(task.model, GroupChannelViT)
    assert task.model(torch.randn(1, 10, 96, 96)).shape == (1, 3)


def test_gradients_reach_embeddings(model: GroupChannelViT) -> None:
    m = GroupChannelViT(num_classes=2, **TINY)
    m(torch.randn(2, 10, 32, 32)).sum().backward()
    for name in ("pos_embed", "group_embed", "cls_token", "patch_embeds.2.proj.weight"):
        assert m.get_parameter(name).grad is not None and m.get_parameter(name).grad.abs().sum() > 0


def test_timm_pretrained_file_overlay(tmp_path) -> None:
    """``pretrained_cfg_overlay=dict(file=...)`` loads our own state dict, resampling the position grid."""
    src = timm.create_model("group_channel_vit_tiny_patch8_96", **TINY)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "gc.pth")
    same = timm.create_model("group_channel_vit_tiny_patch8_96", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "gc.pth")), num_classes=3, **TINY)
    assert torch.equal(same.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(same.pos_embed, src.pos_embed)
    bigger = timm.create_model("group_channel_vit_tiny_patch8_96", pretrained=True, img_size=128,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "gc.pth")), **TINY)
    assert bigger.pos_embed.shape == (1, 256, 24)
    grid = src.pos_embed.reshape(1, 12, 12, 24).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)
    expect = expect.permute(0, 2, 3, 1).reshape(1, 256, 24)
    torch.testing.assert_close(bigger.pos_embed.data, expect, rtol=1e-5, atol=1e-5)


def test_sensor_attribute() -> None:
    assert GroupChannelViT(**TINY).sensor == "sentinel2"
    assert GroupChannelViT(sensor="LandSat8", **TINY).sensor == "landsat8"
    assert GroupChannelViT(band_groups=[["B02"]], **TINY).sensor is None
    assert GroupChannelViT(band_groups=[["B02"]], sensor="sentinel2_l2a", **TINY).sensor == "sentinel2_l2a"


def test_grad_checkpointing_and_pruning() -> None:
    torch.manual_seed(3)
    m = GroupChannelViT(depth=3, embed_dim=32, num_heads=2, num_classes=2).eval()
    x = torch.randn(2, 10, 32, 32)
    ref = m.forward_features(x)
    m.set_grad_checkpointing(True)
    torch.testing.assert_close(m.forward_features(x), ref)
    kept = m.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(m.blocks) == 2 and isinstance(m.head, torch.nn.Identity)
    assert m.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == (2, 32, 4, 4)


# ------------------------------------------------------------------------- timm first-class citizen

ALL_VARIANTS = sorted(timm.list_models("group_channel_vit_*"))


def test_every_variant_is_listed() -> None:
    assert len(ALL_VARIANTS) == 8 and {n.rsplit("_", 2)[0] for n in ALL_VARIANTS} == {
        f"group_channel_vit_{s}" for s in ("tiny", "small", "base", "large")}


def _small_build(name: str, **kwargs) -> GroupChannelViT:
    """The variant at its own width and heads, 2 blocks, a 2 x 2 patch grid (fast on CPU)."""
    torch.manual_seed(0)
    patch = 8 if "patch8" in name else 16
    return timm.create_model(name, depth=2, img_size=2 * patch, num_classes=3, **kwargs).eval()


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_torchscript_matches_eager(name: str) -> None:
    import warnings

    model = _small_build(name)
    x = torch.randn(2, 10, *model.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile / export
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), model(x), rtol=0, atol=0)  # a deployable artefact
    bigger = torch.randn(1, 10, 2 * model.img_size[0], model.img_size[1])  # another grid: pos_embed resampled
    torch.testing.assert_close(scripted(bigger), model(bigger), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_fx_feature_extraction(name: str) -> None:
    from timm.models import create_feature_extractor, get_graph_node_names

    model = _small_build(name)
    x = torch.randn(2, 10, *model.img_size)
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "last_block", "head": "logits"})
    out = extractor(x)
    torch.testing.assert_close(out["logits"], model(x))
    torch.testing.assert_close(out["last_block"], model.blocks(model._embed(x)[0]))
    assert any(n.startswith("blocks.0.") for n in get_graph_node_names(model)[1])
    # the traced graph is not specialised to the example size: a larger image resamples pos_embed
    y = torch.randn(1, 10, 2 * model.img_size[0], 2 * model.img_size[1])
    torch.testing.assert_close(extractor(y)["logits"], model(y))


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_device_and_dtype_keywords(name: str) -> None:
    """timm 1.0 passes device= / dtype= to the constructor: the full-size variant on the meta device (no
    memory), and a small build directly in bfloat16."""
    with torch.device("cpu"):
        meta = timm.create_model(name, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta.pos_embed.shape[1] == meta.grid_size[0] * meta.grid_size[1]
    bf16 = _small_build(name, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16(torch.randn(1, 10, *bf16.img_size, dtype=torch.bfloat16)).dtype == torch.bfloat16
    bf16.reset_classifier(5)
    assert bf16.head.weight.dtype == torch.bfloat16


def test_forward_takes_only_the_tensor() -> None:
    import inspect

    for method in (GroupChannelViT.forward, GroupChannelViT.forward_features):
        assert list(inspect.signature(method).parameters) == ["self", "x"]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_default_cfg_follows_timm_conventions(name: str) -> None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{name}.untrained").to_dict()
    for key in ("url", "num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std",
                "first_conv", "classifier", "license", "fixed_input_size"):
        assert key in cfg, key
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=4)
    state = model.state_dict()
    assert model.pretrained_cfg["tag"] == "untrained" and model.pretrained_cfg["architecture"] == name
    assert cfg["input_size"] == (model.in_chans, *model.img_size)
    assert len(cfg["mean"]) == len(cfg["std"]) == model.in_chans
    assert all(f"{conv}.weight" in state for conv in cfg["first_conv"])
    assert f"{cfg['classifier']}.weight" in state
    assert cfg["fixed_input_size"] is False and not timm.is_model_pretrained(name)

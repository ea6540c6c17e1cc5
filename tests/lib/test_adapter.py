"""Tests of the ExPLoRA adapter: unfreeze specs, LoRA on Q/V rows, merge, accounting, paper numbers."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from explora_geo.adapter import (
    CATEGORIES,
    ExploraConfig,
    LoRALinear,
    adapter_state_dict,
    apply_explora,
    count_parameters,
    load_adapter_state_dict,
    merge_explora,
    merged_state_dict,
    resolve_unfreeze,
)
from explora_geo.errors import ExploraGeoError

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0, init_values=0.1)


def tiny_vit(seed: int = 0, **kwargs) -> nn.Module:
    """A 4-block timm ViT (64 wide, 17 tokens), LayerScale on so every block has ls gammas."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kwargs})


def images(n: int = 2, channels: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def train_a_few_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on a regression loss of the features toward a fixed random target."""
    target = torch.randn_like(model.forward_features(x)).detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model.forward_features(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# ------------------------------------------------------------------------------------------------ specs

@pytest.mark.parametrize(
    ("spec", "depth", "expected"),
    [
        ("L", 24, (23,)),
        ("L", 12, (11,)),
        ("1,L", 24, (0, 23)),
        ("1,L", 12, (0, 11)),
        ("1,L-1,L", 24, (0, 22, 23)),
        ("[1, L-1, L]", 12, (0, 10, 11)),
        ("L-1", 12, (10,)),
        ("3", 4, (2,)),
        ("L,L", 4, (3,)),
        ("", 4, ()),
        ("none", 4, ()),
        ((0, 3), 4, (0, 3)),
        ([3, 0, 3], 4, (0, 3)),
    ],
)
def test_resolve_unfreeze(spec, depth, expected) -> None:
    assert resolve_unfreeze(spec, depth) == expected


@pytest.mark.parametrize(
    ("spec", "depth", "needle"),
    [
        ("13", 12, "depth 12"),
        ("L-12", 12, "depth 12"),
        ("0", 12, "block 0"),
        ((12,), 12, "depth 12"),
        ((-1,), 12, "-1"),
        ("L+1", 12, "'L+1'"),
        ("last", 12, "'last'"),
        ("1;L", 12, "'1;L'"),
    ],
)
def test_resolve_unfreeze_errors_name_the_item_and_depth(spec, depth, needle) -> None:
    with pytest.raises(ExploraGeoError, match=None) as info:
        resolve_unfreeze(spec, depth)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unfreeze_beyond_depth_fails_at_apply_time() -> None:
    with pytest.raises(ExploraGeoError, match="depth 4"):
        apply_explora(tiny_vit(), ExploraConfig(unfreeze="1,5"))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rank": -1}, "-1"),
        ({"rank": 2.5}, "2.5"),
        ({"alpha": 0}, "alpha"),
        ({"targets": ("q", "qkv")}, "'qkv'"),
        ({"dropout": 1.0}, "dropout"),
        ({"unfreeze": "L;1"}, "L;1"),
        ({"unfreeze": (0, -1)}, "-1"),
        ({"unfreeze": (0, 1.0)}, "1.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, needle) -> None:
    with pytest.raises(ExploraGeoError) as info:
        ExploraConfig(**kwargs)
    assert needle in str(info.value)


def test_config_json_round_trip() -> None:
    cfg = ExploraConfig(unfreeze=(0, 3), rank=8, alpha=16.0, targets="q,v,fc1", train_embeddings=True,
                        dropout=0.1)
    data = json.loads(cfg.to_json())
    assert data["targets"] == ["q", "v", "fc1"] and data["unfreeze"] == [0, 3]
    back = ExploraConfig.from_dict(data)
    assert back == cfg
    assert back.scale == pytest.approx(2.0)
    assert ExploraConfig().scale == pytest.approx(1 / 64)  # the paper's public code scale 1/r
    with pytest.raises(ExploraGeoError, match="unknown keys"):
        ExploraConfig.from_dict({**data, "lora_alpha": 1})


# ------------------------------------------------------------------------------------ what trains

def test_requires_grad_pattern_of_the_method() -> None:
    model = apply_explora(tiny_vit(reg_tokens=2, num_classes=5), ExploraConfig(unfreeze="L", rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # last block entirely, nothing else of it is LoRA
    assert {n for n, _ in model.blocks[3].named_parameters(prefix="blocks.3")} <= trainable
    assert not any(isinstance(m, LoRALinear) for m in model.blocks[3].modules())
    for i in range(3):
        qkv = model.blocks[i].attn.qkv
        assert isinstance(qkv, LoRALinear) and list(qkv.segments) == ["q", "v"]
        assert qkv.segments == {"q": (0, 64), "v": (128, 192)}
        assert not qkv.weight.requires_grad and not qkv.bias.requires_grad
        assert {f"blocks.{i}.norm1.weight", f"blocks.{i}.norm2.bias"} <= trainable
        assert f"blocks.{i}.attn.proj.weight" not in trainable
        assert f"blocks.{i}.ls1.gamma" not in trainable
        assert f"blocks.{i}.mlp.fc1.weight" not in trainable
        assert isinstance(model.blocks[i].attn.proj, nn.Linear)
        assert not isinstance(model.blocks[i].attn.proj, LoRALinear)
    assert {"cls_token", "reg_token", "norm.weight", "norm.bias"} <= trainable
    # RGB ViT: embeddings stay frozen by default, head stays frozen
    assert not {"pos_embed", "patch_embed.proj.weight", "head.weight"} & trainable
    assert model.explora_config.rank == 4


def test_switches_turn_parts_off_and_on() -> None:
    cfg = ExploraConfig(unfreeze="", rank=4, train_norms=False, train_cls_token=False, train_embeddings=True,
                        targets=("k", "fc2"))
    model = apply_explora(tiny_vit(reg_tokens=1), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" in trainable and "patch_embed.proj.weight" in trainable
    assert not {"cls_token", "reg_token", "norm.weight", "blocks.0.norm1.weight"} & trainable
    assert all(isinstance(b.mlp.fc2, LoRALinear) for b in model.blocks)
    assert model.blocks[0].attn.qkv.segments == {"k": (64, 128)}
    assert model.blocks[0].mlp.fc2.segments == {"fc2": (0, 64)}


def test_rank_zero_adds_no_lora() -> None:
    model = apply_explora(tiny_vit(), ExploraConfig(rank=0))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert count_parameters(model)["by_category"]["lora"]["total"] == 0


def test_apply_twice_or_on_a_non_vit_is_a_user_error() -> None:
    model = apply_explora(tiny_vit(), ExploraConfig(rank=2))
    with pytest.raises(ExploraGeoError, match="already"):
        apply_explora(model, ExploraConfig(rank=2))
    with pytest.raises(ExploraGeoError, match="Sequential"):
        apply_explora(nn.Sequential(nn.Linear(2, 2)), ExploraConfig())


# ------------------------------------------------------------------------------ numerical contract

def test_zero_b_gives_the_source_output_and_eval_never_merges() -> None:
    source = tiny_vit().eval()
    x = images()
    with torch.no_grad():
        expected = source(x)
    model = apply_explora(tiny_vit(), ExploraConfig(unfreeze="L", rank=8, targets=("q", "v", "proj", "fc1")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        got = model(x)
    assert (got - expected).abs().max().item() <= 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_moves_only_the_adapter_and_merging_is_exact() -> None:
    model = apply_explora(tiny_vit(), ExploraConfig(unfreeze="L", rank=4, alpha=4.0))
    x = images(4)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_a_few_steps(model, x)

    for name, value in frozen_before.items():
        assert torch.equal(model.get_parameter(name), value), name  # bit-identical
    moved = [n for n, v in trainable_before.items() if not torch.equal(model.get_parameter(n), v)]
    assert any(".lora_B." in n for n in moved) and "blocks.3.attn.qkv.weight" in moved

    model.eval()
    with torch.no_grad():
        adapted = model(x)
        state = merged_state_dict(model)
    assert not any("lora" in k for k in state)
    vanilla = tiny_vit(seed=123).eval()
    vanilla.load_state_dict(state, strict=True)
    with torch.no_grad():
        merged_out = vanilla(x)
    assert ((merged_out - adapted).norm() / adapted.norm()).item() <= 1e-5

    # LoRA touched only the Q and V rows of the frozen blocks' fused qkv
    d = 64
    for i in range(3):
        old, new = frozen_before[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.weight"]
        assert torch.equal(old[d:2 * d], new[d:2 * d])  # K rows unchanged
        assert not torch.equal(old[:d], new[:d]) and not torch.equal(old[2 * d:], new[2 * d:])
        assert torch.equal(frozen_before[f"blocks.{i}.attn.proj.weight"], state[f"blocks.{i}.attn.proj.weight"])


def test_merge_explora_returns_a_plain_model_and_keeps_the_input() -> None:
    model = apply_explora(tiny_vit(), ExploraConfig(unfreeze="1", rank=4))
    train_a_few_steps(model, images(), steps=2)
    merged = merge_explora(model).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters()) and not hasattr(merged, "explora_config")
    assert isinstance(model.blocks[1].attn.qkv, LoRALinear)  # input untouched
    model.eval()
    with torch.no_grad():
        a, b = model(images()), merged(images())
    assert ((a - b).norm() / a.norm()).item() <= 1e-5
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())


def test_adapter_state_dict_round_trip_and_mismatch_error() -> None:
    cfg = ExploraConfig(unfreeze="L", rank=4)
    model = apply_explora(tiny_vit(), cfg)
    train_a_few_steps(model, images(), steps=2)
    adapter = adapter_state_dict(model)
    assert set(adapter) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.endswith("qkv.weight") and not k.startswith("blocks.3") for k in adapter)

    fresh = apply_explora(tiny_vit(), cfg)  # same source weights (seed 0)
    load_adapter_state_dict(fresh, adapter)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(images()), fresh(images()))

    other = apply_explora(tiny_vit(), ExploraConfig(unfreeze="1", rank=4))
    with pytest.raises(ExploraGeoError, match="adapter.pt") as info:
        load_adapter_state_dict(other, adapter, source="adapter.pt")
    assert "missing" in str(info.value) and "unexpected" in str(info.value)


def test_lora_gradient_reaches_a_and_b() -> None:
    model = apply_explora(tiny_vit(), ExploraConfig(unfreeze="", rank=2))
    model.forward_features(images()).pow(2).mean().backward()
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_B["q"].grad.abs().sum() > 0 and qkv.lora_B["v"].grad.abs().sum() > 0
    assert qkv.lora_A["q"].grad is not None and qkv.weight.grad is None


def _reference_row_lora(layer: LoRALinear, x: torch.Tensor, lora_x: torch.Tensor) -> torch.Tensor:
    """The LoRALinear output written with plain autograd ops (no custom backward)."""
    out = nn.functional.linear(x, layer.weight, layer.bias)
    pieces, last = [], 0
    for name, (start, stop) in layer.segments.items():
        delta = layer.scale * nn.functional.linear(nn.functional.linear(lora_x, layer.lora_A[name]),
                                                   layer.lora_B[name])
        pieces += [out[..., last:start], out[..., start:stop] + delta]
        last = stop
    return torch.cat([*pieces, out[..., last:]], dim=-1)


def _random_lora(dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 12, dtype=dtype), {"q": (0, 4), "v": (8, 12)}, rank=3, scale=0.5,
                       dropout=dropout)
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.normal_()
    return layer


def test_custom_backward_passes_gradcheck() -> None:
    """The hand-written backward of the fused row-LoRA function, against finite differences (float64),
    for the input, a trainable weight and bias, and the LoRA tensors, with and without a separate LoRA
    input (dropout path)."""
    from explora_geo.adapter import _RowLoRAFunction

    layer = _random_lora()
    segments = tuple(layer.segments.values())
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    lora_x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = (layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True))
    a = torch.cat(list(layer.lora_A.values())).detach().requires_grad_(True)
    bq, bv = (p.detach().clone().requires_grad_(True) for p in layer.lora_B.values())

    def same(x, w, b, a, bq, bv):
        return _RowLoRAFunction.apply(x, x, True, w, b, a, 0.5, segments, bq, bv)

    def separate(x, lx, w, b, a, bq, bv):
        return _RowLoRAFunction.apply(x, lx, False, w, b, a, 0.5, segments, bq, bv)

    assert torch.autograd.gradcheck(same, (x, w, b, a, bq, bv))
    assert torch.autograd.gradcheck(separate, (x, lora_x, w, b, a, bq, bv))


def test_double_backward_raises_instead_of_giving_wrong_second_derivatives() -> None:
    """The hand-written backward is marked ``once_differentiable``: differentiating through it again raises
    (before, ``create_graph=True`` silently gave second derivatives that ignored the LoRA path)."""
    layer = _random_lora()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def test_lora_linear_with_dropout_matches_plain_autograd() -> None:
    layer = _random_lora(dropout=0.3)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    got = layer(x)
    grads = torch.autograd.grad(got.pow(2).sum(), [x, *layer.lora_A.values(), *layer.lora_B.values()])
    torch.manual_seed(7)
    ref = _reference_row_lora(layer, x, layer.lora_dropout(x))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, *layer.lora_A.values(), *layer.lora_B.values()])
    assert torch.allclose(got, ref)
    assert all(torch.allclose(g, r) for g, r in zip(grads, ref_grads, strict=True))
    assert not torch.equal(layer.lora_dropout(x), x)  # the dropout path really ran


def test_lora_linear_under_bf16_autocast() -> None:
    layer = _random_lora(dtype=torch.float32)
    x = torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    ref = _reference_row_lora(layer, x, x)
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.05)
    assert all(p.grad.dtype == torch.float32 for p in layer.lora_B.values()) and x.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------- accounting

def test_count_parameters_categories_add_up() -> None:
    model = apply_explora(tiny_vit(num_classes=3), ExploraConfig(unfreeze="L", rank=4))
    counts = count_parameters(model)
    assert set(counts["by_category"]) == set(CATEGORIES)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    cat = counts["by_category"]
    assert cat["blocks_unfrozen"]["trainable"] == sum(p.numel() for p in model.blocks[3].parameters())
    assert cat["lora"]["trainable"] == 3 * 2 * 4 * (64 + 64)
    assert cat["norms"]["trainable"] == (3 * 2 + 1) * 2 * 64
    assert cat["embeddings"]["trainable"] == 64 and cat["embeddings"]["total"] > 64
    assert cat["other"] == {"trainable": 0, "total": 64 * 3 + 3}  # the head


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    """Paper architectures, built once on the meta device (structure only: no memory, no download)."""
    with torch.device("meta"):
        return {name: timm.create_model(name, pretrained=False)
                for name in ("vit_large_patch14_dinov2", "vit_base_patch14_dinov2")}


@pytest.mark.parametrize(
    ("name", "unfreeze", "rank", "millions"),
    [
        ("vit_large_patch14_dinov2", "L", 64, 18.7),
        ("vit_base_patch14_dinov2", "L", 64, 9.3),
        ("vit_large_patch14_dinov2", "L", 0, 12.7),
        ("vit_large_patch14_dinov2", "1,L-1,L", 64, 43.4),
    ],
)
def test_paper_trainable_parameter_counts(meta_models, name, unfreeze, rank, millions) -> None:
    import copy

    model = apply_explora(copy.deepcopy(meta_models[name]), ExploraConfig(unfreeze=unfreeze, rank=rank))
    assert count_parameters(model)["trainable"] / 1e6 == pytest.approx(millions, abs=0.05)


def test_paper_count_on_a_real_cpu_build() -> None:
    """ViT-B/14 DINOv2 built for real (random init) agrees with the meta-device count."""
    model = apply_explora(timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56),
                          ExploraConfig())
    assert count_parameters(model)["trainable"] / 1e6 == pytest.approx(9.3, abs=0.05)


# ------------------------------------------------------------------------------ group-channel ViT

def tiny_group_channel(seed: int = 0) -> nn.Module:
    """A 3-block Sentinel-2 group-channel ViT (10 bands in 3 groups, 16 px, patch 8: 1 + 3 x 4 tokens)."""
    from explora_geo.models import create_backbone

    torch.manual_seed(seed)
    return create_backbone("group_channel_vit_tiny_patch8_96", bands="sentinel2", img_size=16, embed_dim=64,
                           depth=3, num_heads=4)


def test_group_channel_embeddings_train_by_default_and_merge_exactly() -> None:
    source = tiny_group_channel().eval()
    x = torch.randn(2, len(source.band_names), 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = source(x)
    model = apply_explora(tiny_group_channel(), ExploraConfig(unfreeze="L", rank=4, alpha=4.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"pos_embed", "group_embed", "cls_token", "patch_embeds.0.proj.weight",
            "patch_embeds.2.proj.bias"} <= trainable
    emb = count_parameters(model)["by_category"]["embeddings"]
    assert emb["trainable"] == emb["total"] > 0
    model.eval()
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= 1e-6

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    train_a_few_steps(model, x)
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    model.eval()
    vanilla = tiny_group_channel(seed=9).eval()
    vanilla.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        adapted, merged = model(x), vanilla(x)
    assert ((adapted - merged).norm() / adapted.norm()).item() <= 1e-5
    qkv = merged_state_dict(model)["blocks.0.attn.qkv.weight"]
    assert torch.equal(qkv[64:128], frozen["blocks.0.attn.qkv.weight"][64:128])
    assert not torch.equal(qkv[:64], frozen["blocks.0.attn.qkv.weight"][:64])


def test_group_channel_embeddings_can_be_frozen() -> None:
    model = apply_explora(tiny_group_channel(), ExploraConfig(rank=2, train_embeddings=False))
    assert not model.pos_embed.requires_grad and not model.patch_embeds[0].proj.weight.requires_grad
    assert model.cls_token.requires_grad


def test_register_tokens_train_with_the_cls_token() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False)
    counts = count_parameters(apply_explora(model, ExploraConfig()))
    assert counts["by_category"]["embeddings"]["trainable"] == (1 + 4) * 768
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False)
    counts = count_parameters(apply_explora(model, ExploraConfig(train_cls_token=False)))
    assert counts["by_category"]["embeddings"]["trainable"] == 0

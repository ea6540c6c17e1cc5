"""MAE objective: masks, token hooks, group-aware targets (the channel-order bug), loss, decoder loading."""

from __future__ import annotations

import pytest
import timm
import torch

import explora_geo.models  # noqa: F401  (registers group_channel_vit_*)
from explora_geo.adapter import ExploraConfig, LoRALinear, apply_explora
from explora_geo.objectives.base import group_channel_indices
from explora_geo.objectives.mae import (
    MAEConfig,
    MAEDecoder,
    MAEObjective,
    group_targets,
    patchify,
    reconstruction_loss,
)
from explora_geo.objectives.masking import (
    dropped_tokens,
    keep_indices,
    random_token_mask,
    replaced_tokens,
)
from explora_geo.sensors import get_sensor, select_bands

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)


def gcvit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("group_channel_vit_tiny_patch8_96", **TINY)


def test_random_token_mask_counts_and_modes() -> None:
    torch.manual_seed(0)
    mask = random_token_mask(4, 3, 16, 0.75)
    assert mask.shape == (4, 3, 16) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == 36).all()  # round(0.75 * 48) per image, over all groups together
    assert not all(torch.equal(mask[i, 0], mask[i, 1]) for i in range(4))  # independent across groups
    consistent = random_token_mask(4, 3, 16, 0.75, consistent=True)
    assert (consistent.sum(-1) == 12).all()
    assert torch.equal(consistent[:, 0], consistent[:, 1]) and torch.equal(consistent[:, 0], consistent[:, 2])
    with pytest.raises(ValueError):
        random_token_mask(1, 1, 4, 1.0)


def test_keep_indices_are_the_visible_tokens_in_order() -> None:
    mask = torch.tensor([[[True, False, True, False]], [[False, False, True, True]]])
    assert keep_indices(mask).tolist() == [[1, 3], [0, 1]]


def test_dropped_tokens_keeping_everything_is_the_plain_forward() -> None:
    model = gcvit().eval()
    x = torch.randn(2, 10, 32, 32)
    n = 3 * 16
    keep = torch.arange(n).expand(2, n)
    with dropped_tokens(model, keep):
        hooked = model.forward_features(x)
    assert torch.allclose(hooked, model.forward_features(x), atol=1e-6)
    with dropped_tokens(model, keep[:, :5]):
        assert model.forward_features(x).shape == (2, 1 + 5, 32)
    assert model.forward_features(x).shape == (2, 1 + n, 32)  # the hook is gone afterwards


def test_replaced_tokens_hides_the_masked_patches() -> None:
    model = gcvit().eval()
    token = torch.randn(32)
    x1, x2 = torch.randn(1, 10, 32, 32), torch.randn(1, 10, 32, 32)
    none = torch.zeros(1, 3, 16, dtype=torch.bool)
    with replaced_tokens(model, none, token):
        assert torch.allclose(model.forward_features(x1), model.forward_features(x1), atol=1e-6)
    everything = torch.ones(1, 3, 16, dtype=torch.bool)
    with replaced_tokens(model, everything, token):
        a, b = model.forward_features(x1), model.forward_features(x2)
    assert torch.allclose(a, b, atol=1e-5)  # nothing of the input gets through
    assert not torch.allclose(model.forward_features(x1), model.forward_features(x2), atol=1e-3)


def test_group_targets_take_each_groups_own_bands_by_name() -> None:
    """Targets follow the GROUP's band order even though the groups are not contiguous in the sensor's
    order (B08 comes after B05-B07 in Sentinel-2): the SatMAE public code's channel-order bug."""
    model = gcvit()
    sensor = get_sensor("sentinel2")
    # A scene in the sensor's own band order whose every pixel holds the band's wavelength.
    wavelengths = torch.tensor([b.wavelength_nm for b in sensor.bands])
    scene = wavelengths.view(1, -1, 1, 1).expand(1, len(wavelengths), 32, 32)
    x = scene[:, select_bands(sensor.band_names, model.band_names)]  # model input order (groups flattened)
    channels = group_channel_indices(model, x.shape[1])
    targets = group_targets(x, channels, 8)
    for group, target in zip(model.band_groups, targets, strict=True):
        expected = torch.tensor([sensor.band(b).wavelength_nm for b in group])
        # patchify lays a patch out as (row, col, channel): channel varies fastest.
        assert torch.equal(target[0, 0, : len(group)], expected)
    # The buggy variant: cut the band-ordered scene into consecutive slices of the group sizes.
    sensor_order = sorted(model.band_names, key=sensor.band_names.index)
    in_band_order = scene[:, select_bands(sensor.band_names, sensor_order)]
    buggy = patchify(in_band_order[:, :4], 8)
    assert not torch.equal(buggy, targets[0])  # B05 where B08 belongs


def test_reconstruction_loss_counts_masked_valid_patches_only() -> None:
    torch.manual_seed(0)
    target = [torch.randn(2, 4, 16 * 3), torch.randn(2, 4, 16 * 2)]
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    pred = [t.clone() for t in target]
    for p in pred:
        p[:, 2:] += 5.0  # wrong on visible tokens only: does not count
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(0.0)
    pred[0][0, 0] += 1.0  # masked token 0 of image 0, group 0: error 1 on one of 4 x 2 counted tokens
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(1.0 / 8)
    valid = torch.ones(2, 4, 16)
    valid[0, 0] = 0  # that patch is all nodata: no longer counted
    assert reconstruction_loss(pred, target, mask, valid).item() == pytest.approx(0.0)
    normed = reconstruction_loss([torch.zeros_like(t) for t in target], target, mask, norm_pix=True)
    assert normed.item() == pytest.approx(1.0, rel=0.15)  # normalised targets have unit variance


@pytest.mark.parametrize("mode", ["independent", "consistent"])
def test_mae_objective_trains_adapter_only_and_predicts_every_group(mode: str) -> None:
    model = apply_explora(gcvit(), ExploraConfig(unfreeze="L", rank=4))
    objective = MAEObjective(model, 10, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2, mask_mode=mode))
    assert [p.out_features for p in objective.decoder.pred] == [64 * 4, 64 * 4, 64 * 2]
    out = objective({"image": torch.randn(2, 10, 32, 32), "valid_mask": torch.ones(2, 32, 32, dtype=torch.bool)})
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    out["loss"].backward()
    frozen = model.blocks[0].attn.qkv.weight
    assert frozen.grad is None and not frozen.requires_grad
    assert model.blocks[0].attn.qkv.lora_A["q"].grad is not None
    assert all(p.grad is not None for p in objective.decoder.pred.parameters())


def _official_decoder(dim: int, depth: int, heads: int, embed: int, pred_out: int) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as in an official MAE 'visualize' checkpoint (decoder part)."""
    ref = MAEDecoder(embed, dim, depth, heads, 8, [pred_out // 64])
    out = {"mask_token": ref.mask_token.detach().clone(), "decoder_pos_embed": torch.zeros(1, 17, dim)}
    for key, value in ref.state_dict().items():
        head, _, rest = key.partition(".")
        official = {"embed": "decoder_embed", "blocks": "decoder_blocks", "norm": "decoder_norm"}.get(head)
        if head == "pred":
            official, rest = "decoder_pred", rest.partition(".")[2]
        if official:
            out[f"{official}.{rest}"] = value.detach().clone() + 0.5  # distinguishable from a fresh init
    return out


def test_official_decoder_loads_and_gets_lora() -> None:
    official = _official_decoder(32, 1, 2, 32, 64 * 3)
    model = apply_explora(gcvit(), ExploraConfig(unfreeze="L", rank=4))
    objective = MAEObjective(model, 10, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                                  decoder_lora_rank=2), decoder_state=official)
    dec = objective.decoder
    assert "blocks.0.attn.qkv.weight" in objective.decoder_loaded and "mask_token" in objective.decoder_loaded
    assert not any(k.startswith("pred.") for k in objective.decoder_loaded)  # RGB pred does not fit 4 bands
    assert torch.equal(dec.blocks[0].mlp.fc1.weight, official["decoder_blocks.0.mlp.fc1.weight"])
    assert torch.equal(dec.embed.weight, official["decoder_embed.weight"])
    qkv = dec.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and not qkv.weight.requires_grad and qkv.lora_A["q"].requires_grad
    assert dec.blocks[0].norm1.weight.requires_grad and dec.embed.weight.requires_grad
    assert not dec.blocks[0].mlp.fc1.weight.requires_grad
    # An RGB ViT's decoder takes the prediction layer too.
    rgb = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0)
    rgb_obj = MAEObjective(rgb, 3, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                             decoder_lora_rank=0), decoder_state=official)
    assert "pred.0.weight" in rgb_obj.decoder_loaded
    assert all(p.requires_grad for p in rgb_obj.decoder.parameters())  # rank 0: the loaded decoder trains fully


def test_decoder_report_lists_every_tensor_and_never_freezes_a_block_that_was_not_loaded() -> None:
    """A 1-block official decoder into a 2-block decoder of a 10-band model: block 0 loaded (frozen + LoRA),
    block 1 new (trains fully), the RGB prediction layer mismatched (trains), decoder_pos_embed ignored."""
    official = _official_decoder(32, 1, 2, 32, 64 * 3)
    objective = MAEObjective(apply_explora(gcvit(), ExploraConfig(unfreeze="L", rank=4)), 10,
                             MAEConfig(decoder_dim=32, decoder_depth=2, decoder_heads=2, decoder_lora_rank=2),
                             decoder_state=official)
    report = objective.decoder_report
    dec = objective.decoder
    plain_names = set(MAEDecoder(32, 32, 2, 2, 8, [4, 4, 2]).state_dict())
    assert set(report.status) == plain_names  # every decoder tensor has a status
    assert report.source_has_decoder and report.ignored == ["decoder_pos_embed"]
    assert report.status["blocks.0.attn.qkv.weight"] == "loaded" and report.status["mask_token"] == "loaded"
    assert report.status["blocks.1.attn.qkv.weight"] == "new"
    assert report.status["pred.0.weight"] == "mismatched: source (192, 32) vs decoder (256, 32)"
    assert report.blocks_not_loaded() == [1]
    assert isinstance(dec.blocks[0].attn.qkv, LoRALinear) and not dec.blocks[0].mlp.fc1.weight.requires_grad
    assert not isinstance(dec.blocks[1].attn.qkv, LoRALinear)
    assert all(p.requires_grad for p in dec.blocks[1].parameters())  # random block: trained, not frozen
    assert all(p.requires_grad for p in dec.pred.parameters())
    as_dict = report.to_dict()
    assert "pred.0.weight" in as_dict["mismatched"] and "blocks.1.norm1.weight" in as_dict["new"]
    assert "block(s) 1 not fully loaded" in report.summary()


def test_no_decoder_in_the_source_is_said_and_the_decoder_trains_fully() -> None:
    objective = MAEObjective(apply_explora(gcvit(), ExploraConfig(unfreeze="L", rank=4)), 10,
                             MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    report = objective.decoder_report
    assert not report.source_has_decoder and set(report.status.values()) == {"new"}
    assert "no MAE decoder" in report.summary() and "vit_large_patch16_224.mae" in report.summary()
    assert all(p.requires_grad for p in objective.decoder.parameters())


def test_norm_pix_loss_is_on_by_default() -> None:
    assert MAEConfig().norm_pix_loss is True


def test_m_1l_r32_parameter_accounting_of_the_docs() -> None:
    """docs/adapter.md's account of M-[1,L]-r32 (paper: 29.7M): the encoder alone is 28.94M; with the MAE
    decoder's trainable parts other than its prediction layers (LoRA r8 on Q,V, norms, decoder_embed, mask
    token) it is 29.61M; every trainable decoder tensor included it is 29.94M."""
    from explora_geo.adapter import count_parameters
    from explora_geo.objectives.mae import DecoderReport, _adapt_decoder

    with torch.device("meta"):
        encoder = apply_explora(timm.create_model("group_channel_vit_large_patch8_96"),
                                ExploraConfig(unfreeze="1,L", rank=32))
        decoder = MAEDecoder(1024, 512, 8, 16, 8, [4, 4, 2])
        loaded = {k: "mismatched" if k.startswith("pred.") else "loaded" for k in decoder.state_dict()}
        _adapt_decoder(decoder, 8, DecoderReport(True, loaded))  # an official MAE ViT-L decoder, RGB pred
    counts = count_parameters(encoder)
    assert counts["trainable"] == 28_939_008
    cats = {k: v["trainable"] for k, v in counts["by_category"].items()}
    assert (cats["blocks_unfrozen"], cats["lora"], cats["norms"], cats["embeddings"]) == (
        25_192_448, 2_883_584, 92_160, 770_816)
    parts: dict[str, int] = {}
    for name, p in decoder.named_parameters():
        if p.requires_grad:
            key = "lora" if "lora_" in name else "norms" if "norm" in name else name.split(".")[0]
            parts[key] = parts.get(key, 0) + p.numel()
    assert parts == {"lora": 131_072, "norms": 17_408, "embed": 524_800, "mask_token": 512, "pred": 328_320}
    assert counts["trainable"] + sum(v for k, v in parts.items() if k != "pred") == 29_612_800
    assert counts["trainable"] + sum(parts.values()) == 29_941_120

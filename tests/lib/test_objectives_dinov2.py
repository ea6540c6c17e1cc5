"""DINOv2 objective: shared-frozen EMA teacher, loss maths, Sinkhorn-Knopp, schedules, multi-crop."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import explora_geo.models  # noqa: F401  (registers group_channel_vit_*)
from explora_geo.adapter import ExploraConfig, apply_explora
from explora_geo.augment import MultiCrop, MultiCropConfig, band_jitter
from explora_geo.objectives.dinov2 import (
    DINOv2Config,
    DINOv2Objective,
    build_teacher,
    cross_view_loss,
    ema_pairs,
    ema_update,
    masked_patch_loss,
    sinkhorn_knopp,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
SMALL_HEAD = dict(head_hidden_dim=32, head_bottleneck_dim=16, num_prototypes=64,
                  crops=MultiCropConfig(global_size=0, local_size=0, n_local=2))


def adapted() -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_explora(timm.create_model("group_channel_vit_tiny_patch8_96", **TINY),
                         ExploraConfig(unfreeze="L", rank=4))


def test_teacher_shares_frozen_tensors_and_copies_trainable_ones() -> None:
    student = adapted()
    teacher = build_teacher(student)
    t_params = dict(teacher.named_parameters(remove_duplicate=False))
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert t_params[name] is not p and t_params[name].data_ptr() != p.data_ptr()
            assert torch.equal(t_params[name], p) and not t_params[name].requires_grad
        else:
            assert t_params[name] is p  # the same tensor object, not a copy
    # LoRA stays unmerged in the teacher.
    assert "blocks.0.attn.qkv.lora_A.q" in t_params


def test_ema_updates_trainable_copies_only() -> None:
    student = adapted()
    teacher = build_teacher(student)
    frozen_before = student.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(1.0)
    s, t = ema_pairs(student, teacher)
    before = [x.clone() for x in t]
    ema_update(s, t, 0.9)
    for new, old, stu in zip(t, before, s, strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * stu)
    assert torch.equal(student.blocks[0].attn.qkv.weight, frozen_before)
    assert teacher.blocks[0].attn.qkv.weight is student.blocks[0].attn.qkv.weight


def test_sinkhorn_knopp_balances_prototypes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(32, 8)
    q = sinkhorn_knopp(logits, temp=0.5, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((8,), 32 / 8), atol=1e-2)  # uniform prototype marginal
    assert torch.equal(q.argmax(1), sinkhorn_knopp(logits + 100.0, temp=0.5, iterations=50).argmax(1))


def test_cross_view_loss_skips_same_view_pairs() -> None:
    torch.manual_seed(0)
    t = [F.softmax(torch.randn(4, 8), -1) for _ in range(2)]
    s = [torch.randn(4, 8) for _ in range(3)]

    def ce(tp: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
        return -(tp * F.log_softmax(sl / 0.1, -1)).sum(-1).mean()

    expected = (ce(t[1], s[0]) + ce(t[0], s[1]) + ce(t[0], s[2]) + ce(t[1], s[2])) / 4
    assert torch.allclose(cross_view_loss(t, s, 0.1), expected)


def test_masked_patch_loss_averages_per_image() -> None:
    masks = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.zeros(3, 2)  # uniform: each token's CE is log 2
    assert masked_patch_loss(teacher, student, masks, 0.1).item() == pytest.approx(2 * math.log(2) / 3)


def test_schedules() -> None:
    obj = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD))
    assert obj.teacher_temp(0, 100) == pytest.approx(0.04) and obj.teacher_temp(30, 100) == pytest.approx(0.07)
    assert obj.teacher_temp(15, 100) == pytest.approx(0.055)
    assert obj.momentum(0, 100) == pytest.approx(0.992) and obj.momentum(100, 100) == pytest.approx(1.0)
    assert obj.weight_decay(0, 100) == pytest.approx(0.04) and obj.weight_decay(100, 100) == pytest.approx(0.4)
    assert obj.freeze_last_layer_steps(100) == 10 and obj.freeze_last_layer_steps(10**6) == 3000
    assert obj.default_lr(1024) == pytest.approx(1e-3) and obj.default_lr(256) == pytest.approx(5e-4)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn"])
def test_step_trains_student_not_teacher_and_freezes_last_layer(centering: str) -> None:
    backbone = adapted()
    obj = DINOv2Objective(backbone, DINOv2Config(**SMALL_HEAD, centering=centering, freeze_last_layer_steps=2))
    obj.set_max_steps(10)
    torch.manual_seed(1)
    out = obj({"image": torch.rand(4, 10, 32, 32)}, step=0, max_steps=10)
    assert torch.isfinite(out["loss"]) and out["ibot"].item() >= 0
    out["loss"].backward()
    assert backbone.blocks[0].attn.qkv.weight.grad is None
    assert backbone.blocks[0].attn.qkv.lora_B["v"].grad is not None
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert obj.mask_token.grad is not None
    trainable = {id(p) for p in obj.student_parameters()}
    assert not trainable & {id(p) for p in obj.teacher.parameters()}
    obj.before_optimizer_step(1)
    assert all(p.grad is None for p in obj.head.last_layer.parameters())
    out = obj({"image": torch.rand(4, 10, 32, 32)}, step=2, max_steps=10)
    out["loss"].backward()
    obj.before_optimizer_step(2)
    assert all(p.grad is not None for p in obj.head.last_layer.parameters())
    if centering == "softmax":
        assert obj.cls_center.value.abs().sum() > 0  # the centre moved


def test_multicrop_any_band_count_and_band_jitter_keeps_bands_apart() -> None:
    torch.manual_seed(0)
    crop = MultiCrop(MultiCropConfig(global_size=16, local_size=8, n_local=3))
    g, loc = crop(torch.rand(2, 7, 32, 32))
    assert [x.shape for x in g] == [(2, 7, 16, 16)] * 2 and [x.shape for x in loc] == [(2, 7, 8, 8)] * 3
    x = torch.zeros(4, 5, 8, 8)
    x[:, 2] = 1.0
    y = band_jitter(x, p=1.0, gain=0.5, offset=0.0, brightness=0.5)
    assert torch.equal(y[:, [0, 1, 3, 4]], x[:, [0, 1, 3, 4]])  # zero bands stay zero: no band mixing
    assert not torch.equal(y[:, 2], x[:, 2])


def test_config_json_round_trip_restores_crop_tuples() -> None:
    cfg = DINOv2Config(mask_ratio=(0.2, 0.4), crops=MultiCropConfig(global_size=16, local_scale=(0.1, 0.3)))
    again = DINOv2Config(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.crops, MultiCropConfig) and again.crops.local_scale == (0.1, 0.3)
    assert MultiCropConfig.from_dict({"n_local": 4}) == MultiCropConfig(n_local=4)

def test_no_masked_patch_is_harmless() -> None:
    """A batch where iBOT masked nothing: zero iBOT loss, finite total, centres and Sinkhorn unharmed."""
    from lightly.models.modules.center import Center

    from explora_geo.objectives.dinov2 import update_center

    empty = torch.zeros(0, 8)
    assert sinkhorn_knopp(empty, 0.1).shape == (0, 8)
    center = Center((1, 8), momentum=0.5)
    update_center(center, empty)
    assert torch.equal(center.value, torch.zeros(1, 8))
    update_center(center, torch.ones(3, 8))
    assert torch.allclose(center.value, torch.full((1, 8), 0.5))
    obj = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD, mask_probability=0.0, centering="sinkhorn"))
    out = obj({"image": torch.rand(2, 10, 32, 32)})
    assert out["ibot"].item() == 0.0 and torch.isfinite(out["loss"])


# ------------------------------------------------------------------------------- recipe fidelity

def test_teacher_stays_in_eval_mode_and_its_dropout_never_fires() -> None:
    """Lightning calls ``.train()`` on the whole module every epoch: the student trains, the teacher does not
    (with drop-path on, a teacher in training mode would give different targets for the same input)."""
    torch.manual_seed(0)
    backbone = apply_explora(timm.create_model("group_channel_vit_tiny_patch8_96", drop_path_rate=0.5, **TINY),
                             ExploraConfig(unfreeze="L", rank=4))
    obj = DINOv2Objective(backbone, DINOv2Config(**SMALL_HEAD))
    assert not obj.teacher.training and not any(m.training for m in obj.teacher.modules())
    obj.train()
    assert obj.training and obj.backbone.training and obj.head.training
    assert not any(m.training for m in obj.teacher.modules())
    x = torch.rand(2, 10, 32, 32)
    with torch.no_grad():
        t1, t2 = (obj.teacher["backbone"].forward_features(x) for _ in range(2))
        s1, s2 = (obj.backbone.forward_features(x) for _ in range(2))
    assert torch.equal(t1, t2)  # deterministic targets
    assert not torch.equal(s1, s2)  # the student's drop-path does fire
    obj.eval()
    assert not obj.backbone.training and not obj.teacher.training


def test_augmentation_probabilities_follow_dinov2() -> None:
    """Blur p=1.0 on global crop 1, 0.1 on global crop 2, 0.5 on local crops; solarize p=0.2 on global crop 2
    for RGB only (the kornia ops' own p)."""
    import kornia.augmentation as K

    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=4)
    rgb = MultiCrop(cfg, rgb=True)
    assert [b.p for b in rgb.global_blurs] == [1.0, 0.1]
    assert isinstance(rgb.local_blur, K.RandomGaussianBlur) and rgb.local_blur.p == 0.5
    assert isinstance(rgb.global_solarize[0], torch.nn.Identity)
    assert isinstance(rgb.global_solarize[1], K.RandomSolarize) and rgb.global_solarize[1].p == 0.2
    multispectral = MultiCrop(cfg)
    assert all(isinstance(s, torch.nn.Identity) for s in multispectral.global_solarize)
    # A third global crop repeats the last entry.
    assert [b.p for b in MultiCrop(MultiCropConfig(global_size=16, local_size=8, n_global=3)).global_blurs] == [
        1.0, 0.1, 0.1]


def test_solarisation_counted_on_a_seeded_batch() -> None:
    """Constant 0.9 images (crops, flips and blur keep them constant; jitter off): solarised crops become 0.1.
    About 20 % of global crop 2 is solarised, never global crop 1, never a multispectral input."""
    cfg = MultiCropConfig(global_size=8, local_size=8, n_local=0, jitter_p=0.0)
    x = torch.full((2000, 3, 8, 8), 0.9)
    torch.manual_seed(0)
    g1, g2 = MultiCrop(cfg, rgb=True)(x)[0]
    solarised = (g2.mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert abs(solarised - 0.2) < 0.03  # 3.4 sigma for n = 2000
    assert bool((g1 > 0.85).all())
    torch.manual_seed(0)
    ms = MultiCrop(cfg, rgb=False)(torch.full((500, 3, 8, 8), 0.9))[0]
    assert all(bool((c > 0.85).all()) for c in ms)


def test_rgb_detection_from_band_names() -> None:
    from explora_geo.objectives.dinov2 import is_rgb_input

    class Stub(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            self.band_names = names

    assert is_rgb_input(Stub(["R", "G", "B"])) and is_rgb_input(Stub(["B04", "B03", "B02"]))
    assert not is_rgb_input(Stub(["B08", "B11", "B12"])) and not is_rgb_input(Stub(["B02", "B03", "B04", "B08"]))
    dino = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD))
    assert dino.crop.rgb is False  # the 10-band Sentinel-2 model


def test_separate_ibot_head_has_its_own_teacher_and_trains() -> None:
    obj = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD, separate_ibot_head=True,
                                                  freeze_last_layer_steps=0, mask_probability=1.0))
    assert obj.ibot_head is not None and "ibot_head" in obj.teacher
    torch.manual_seed(1)
    out = obj({"image": torch.rand(4, 10, 32, 32)}, step=0, max_steps=10)
    out["loss"].backward()
    assert obj.ibot_head.last_layer.parametrizations.weight.original1.grad is not None
    ids = {id(p) for p in obj.student_parameters()}
    assert all(id(p) in ids for p in obj.ibot_head.parameters())
    before = obj.teacher["ibot_head"].last_layer.parametrizations.weight.original1.clone()
    with torch.no_grad():
        for p in obj.ibot_head.parameters():
            p.add_(1.0)
    obj.after_optimizer_step(0, 10)
    assert not torch.equal(obj.teacher["ibot_head"].last_layer.parametrizations.weight.original1, before)
    shared = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD))
    assert shared.ibot_head is None and "ibot_head" not in shared.teacher


def test_mask_token_from_the_source_or_reported_new() -> None:
    token = torch.randn(1, 32)
    loaded = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD), mask_token=token,
                             mask_token_source="dinov2_vits14_pretrain.pth")
    assert torch.equal(loaded.mask_token.detach(), token)
    assert loaded.mask_token_source == "loaded from dinov2_vits14_pretrain.pth"
    new = DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD))
    assert torch.equal(new.mask_token.detach(), torch.zeros(1, 32)) and new.mask_token_source.startswith("new")
    from explora_geo.errors import ExploraGeoError

    with pytest.raises(ExploraGeoError, match="mask_token of shape"):
        DINOv2Objective(adapted(), DINOv2Config(**SMALL_HEAD), mask_token=torch.zeros(1, 64))

"""Tests of backbone files: save/load round trips, merged adapters, sidecar validation, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from explora_geo.adapter import ExploraConfig, apply_explora
from explora_geo.checkpoint import backbone_paths, load_backbone, read_sidecar, save_backbone, validate_sidecar
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization

KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
RGB = {"bands": ["R", "G", "B"], "model_kwargs": KWARGS, "gsd_m": 0.6}


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{"num_classes": 0, **KWARGS, **overrides})


def x_rgb(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_round_trip_plain_vit(tmp_path: Path) -> None:
    model = tiny_vit().eval()
    norm = Normalization("reflectance", ("R", "G", "B"), divide=255.0)
    weights, side = save_backbone(model, tmp_path / "out" / "backbone", {**RGB, "normalization": norm.to_dict(),
                                                                          "source_weights": "timm:random"})
    assert weights == tmp_path / "out" / "backbone.safetensors" and side.name == "backbone.json"
    assert sorted(p.name for p in weights.parent.iterdir()) == ["backbone.json", "backbone.safetensors"]
    data = json.loads(side.read_text())
    assert data["architecture"] == "vit_tiny_patch16_224" and data["img_size"] == 32
    assert data["patch_size"] == 8 and data["embed_dim"] == 64 and data["explora"] is None
    with safe_open(weights, "pt") as f:
        assert json.loads(f.metadata()["explora_geo_sidecar"]) == data

    for spelled in (tmp_path / "out" / "backbone", weights, side):
        loaded, sidecar = load_backbone(spelled)
        assert sidecar == data
        assert loaded.band_names == ["R", "G", "B"]
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x_rgb()), model(x_rgb()))


def test_adapted_model_is_saved_merged_and_loads_strictly(tmp_path: Path) -> None:
    model = apply_explora(tiny_vit(num_classes=4), ExploraConfig(unfreeze="L", rank=4, alpha=4.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model.forward_features(x_rgb()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_backbone(model, tmp_path / "b.safetensors", {**RGB, "objective": "mae"})
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k or k.startswith("head.") for k in keys)
    assert set(keys) == set(tiny_vit().state_dict())

    loaded, sidecar = load_backbone(tmp_path / "b")
    assert sidecar["explora"] == model.explora_config.to_dict() and sidecar["objective"] == "mae"
    model.eval()
    with torch.no_grad():
        a, b = model.forward_features(x_rgb()), loaded.eval().forward_features(x_rgb())
    assert ((a - b).norm() / a.norm()).item() <= 1e-5

    with_head, _ = load_backbone(tmp_path / "b", num_classes=5)
    assert with_head.get_classifier().out_features == 5
    assert torch.equal(with_head.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.weight)


def test_group_channel_round_trip(tmp_path: Path) -> None:
    from explora_geo.models import create_backbone

    kwargs = dict(img_size=16, embed_dim=64, depth=2, num_heads=4)
    torch.manual_seed(0)
    model = apply_explora(create_backbone("group_channel_vit_tiny_patch8_96", bands="sentinel2", **kwargs),
                          ExploraConfig(rank=2))
    save_backbone(model, tmp_path / "gc", {"model_kwargs": {**kwargs, "sensor": "sentinel2"},
                                           "sensor": "sentinel2", "gsd_m": 10.0})
    sidecar = read_sidecar(tmp_path / "gc.json")
    assert sidecar["band_groups"] == [list(g) for g in model.band_groups]
    assert sidecar["bands"] == model.band_names and sidecar["explora"]["train_embeddings"] is None
    loaded, _ = load_backbone(tmp_path / "gc")
    x = torch.randn(1, len(model.band_names), 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.eval()(x), atol=1e-6)


def test_missing_required_field_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExploraGeoError, match="bands"):
        save_backbone(tiny_vit(), tmp_path / "x", {"model_kwargs": KWARGS})
    with pytest.raises(ExploraGeoError, match="objective"):
        save_backbone(tiny_vit(), tmp_path / "x", {**RGB, "objective": "simclr"})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_files_and_leaves_no_partials(tmp_path: Path, monkeypatch) -> None:
    save_backbone(tiny_vit(seed=1), tmp_path / "b", RGB)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(tiny_vit(seed=2), tmp_path / "b", RGB)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_weights_of_another_architecture_name_keys_and_file(tmp_path: Path) -> None:
    weights, side = save_backbone(tiny_vit(), tmp_path / "b", RGB)
    data = json.loads(side.read_text())
    data["model_kwargs"]["depth"] = 2
    side.write_text(json.dumps(data))
    with pytest.raises(ExploraGeoError) as info:
        load_backbone(side)
    message = str(info.value)
    assert str(weights) in message and "unexpected: blocks.2." in message

    data["model_kwargs"].update(depth=3, embed_dim=32, num_heads=2)
    side.write_text(json.dumps(data))
    with pytest.raises(ExploraGeoError, match="wrong shape: "):
        load_backbone(side)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    weights, side = save_backbone(tiny_vit(), tmp_path / "b", RGB)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExploraGeoError, match=f"{weights}.*corrupt"):
        load_backbone(weights)
    weights.unlink()
    with pytest.raises(ExploraGeoError, match=f"{weights}.*do not exist"):
        load_backbone(side)
    side.write_text("{not json")
    with pytest.raises(ExploraGeoError, match=f"{side}.*not valid JSON"):
        read_sidecar(side)
    with pytest.raises(ExploraGeoError, match="nope.json does not exist"):
        read_sidecar(tmp_path / "nope")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"format": "timm"}, "format"),
        ({"format_version": 2}, "format_version 2"),
        ({"colour": 1}, "colour"),
        ({"bands": []}, "'bands'"),
        ({"band_groups": [["G"], ["R", "B"]]}, "band_groups"),
        ({"img_size": "big"}, "img_size"),
        ({"gsd_m": -1}, "gsd_m"),
        ({"model_kwargs": {"num_classes": 3}}, "num_classes"),
        ({"normalization": {"scheme": "zscore", "bands": ["R"]}}, "zscore"),
        ({"explora": {"rank": -2}}, "-2"),
        ({"architecture": None}, "architecture"),
    ],
)
def test_sidecar_validation(change, needle) -> None:
    good = {"format": "explora-geo-backbone", "format_version": 1, "architecture": "vit_tiny_patch16_224",
            "bands": ["R", "G", "B"], "img_size": 32, "patch_size": 8, "embed_dim": 64}
    assert validate_sidecar(good)["model_kwargs"] == {}
    with pytest.raises(ExploraGeoError) as info:
        validate_sidecar({**good, **change}, source="my.json")
    assert needle in str(info.value)


def test_unknown_architecture_is_a_user_error(tmp_path: Path) -> None:
    _, side = save_backbone(tiny_vit(), tmp_path / "b", RGB)
    side.write_text(side.read_text().replace("vit_tiny_patch16_224", "vit_imaginary"))
    with pytest.raises(ExploraGeoError, match="'vit_imaginary'"):
        load_backbone(side)


def test_backbone_paths() -> None:
    assert backbone_paths("a/b.v1") == (Path("a/b.v1.safetensors"), Path("a/b.v1.json"))
    assert backbone_paths("a/b.json") == backbone_paths("a/b.safetensors") == backbone_paths("a/b")


def test_save_refuses_a_sidecar_that_would_not_rebuild_the_model(tmp_path: Path) -> None:
    with pytest.raises(ExploraGeoError, match="does not rebuild this model.*model_kwargs"):
        save_backbone(tiny_vit(), tmp_path / "b", {**RGB, "model_kwargs": {**KWARGS, "depth": 2}})
    with pytest.raises(ExploraGeoError, match="do not fit vit_tiny_patch16_224"):
        save_backbone(tiny_vit(), tmp_path / "b", {**RGB, "model_kwargs": {**KWARGS, "n_layers": 2}})
    assert list(tmp_path.iterdir()) == []

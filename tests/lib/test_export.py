"""``explora_geo.export`` / ``explora-geo export``: the ONNX bundle the QGIS plugin reads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from explora_geo.cli import main
from explora_geo.errors import ExploraGeoError
from explora_geo.export import ONNX_OPSET, HeadSpec, export_onnx, load_head_spec
from explora_geo.normalization import Normalization
from explora_geo.sensors import canonical_band_name, select_bands

REPO = Path(__file__).resolve().parents[2]
EUROSAT_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load("make_tiny_bundle", REPO / "tests" / "plugin" / "make_tiny_bundle.py")


def _plugin_core() -> Any:
    """The plugin's numpy-only core (importable here because it needs no qgis)."""
    sys.path.insert(0, str(REPO / "qgis_plugin"))
    try:
        from explora_geo_qgis.core import bands, scaling
    finally:
        sys.path.remove(str(REPO / "qgis_plugin"))
    return bands, scaling


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny")
    return {"backbone": tiny.build_backbone(out), "head": tiny.build_head(out), "dir": out}


def _eurosat_tiles(eurosat_dir: Path, bands: list[str], n: int = 6) -> np.ndarray:
    """``n`` real EuroSAT chips, model bands selected by name, centre 32 x 32 px: ``[n, C, 32, 32]`` DN."""
    import rasterio

    idx = select_bands(EUROSAT_BANDS, bands, source="EuroSAT")
    chips = []
    for path in sorted(eurosat_dir.glob("*/*.tif"))[::35][:n]:
        with rasterio.open(path) as src:
            chips.append(src.read()[idx, 16:48, 16:48].astype(np.float32))
    return np.stack(chips)


def _metadata(path: Path) -> dict[str, Any]:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def test_embedder_bundle(files: dict[str, Path], tmp_path: Path) -> None:
    onnx_path, json_path = export_onnx(files["backbone"], tmp_path / "emb.onnx")
    meta = _metadata(onnx_path)
    assert meta == json.loads(json_path.read_text())
    assert meta["model_type"] == "embedder" and meta["class_names"] == [] and meta["outputs"] == ["embedding"]
    assert meta["bands"] == ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert meta["wavelengths_nm"][:2] == [492.4, 559.8]
    assert (meta["tile_size"], meta["patch_size"], meta["gsd_m"], meta["resolution"]) == (32, 8, 10.0, 1000.0)
    assert meta["embedding_dim"] == 64 and meta["normalization"]["scheme"] == "satmae"
    assert meta["explora"]["architecture"] == "group_channel_vit_tiny_patch8_96"
    assert meta["explora"]["objective"] == "mae"
    model = onnx.load(str(onnx_path))
    assert model.opset_import[0].version == ONNX_OPSET == meta["onnx_opset"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # dynamic batch
        out = session.run(None, {"image": np.zeros((n, 10, 32, 32), np.float32)})
        assert [o.shape for o in out] == [(n, 64)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json", "emb.onnx"]  # no temporary leftovers


def test_classifier_matches_torch_on_real_data(files: dict[str, Path], tmp_path: Path, eurosat_dir: Path) -> None:
    from explora_geo.checkpoint import load_backbone
    from explora_geo.downstream.probe import ProbeClassifier, load_head

    onnx_path, _ = export_onnx(files["backbone"], tmp_path / "cls.onnx", head=files["head"])
    meta = _metadata(onnx_path)
    assert meta["model_type"] == "classifier" and meta["class_names"] == tiny.CLASSES
    assert meta["class_colors"] == tiny.COLORS and meta["explora"]["head"] == "probe:head.safetensors"
    backbone, sidecar = load_backbone(files["backbone"])
    head, head_meta = load_head(files["head"])
    reference = ProbeClassifier(backbone.eval(), head, head_meta["n_last_blocks"], head_meta["avgpool"]).eval()
    norm = Normalization.from_dict(meta["normalization"])
    x = torch.from_numpy(norm(_eurosat_tiles(eurosat_dir, meta["bands"])))
    with torch.no_grad():
        want_probs = torch.softmax(reference(x), dim=-1).numpy()
        want_emb = backbone(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    emb, probs = session.run(["embedding", "probabilities"], {"image": x.numpy()})
    np.testing.assert_allclose(emb, want_emb, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs, want_probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_torchgeo_checkpoint_head(files: dict[str, Path], tmp_path: Path) -> None:
    from explora_geo.checkpoint import load_backbone

    linear = torch.nn.Linear(64, 4)
    ckpt = {"state_dict": {"model.head.weight": linear.weight.detach(), "model.head.bias": linear.bias.detach(),
                           "model.cls_token": torch.zeros(1, 1, 64)},
            "hyper_parameters": {"model": "group_channel_vit_tiny_patch8_96", "num_classes": 4,
                                 "class_names": ["a", "b", "c", "d"]}}
    torch.save(ckpt, tmp_path / "task.ckpt")
    spec = load_head_spec(tmp_path / "task.ckpt")
    assert spec.on_embedding and spec.class_names == ["a", "b", "c", "d"]
    onnx_path, _ = export_onnx(files["backbone"], tmp_path / "tg.onnx", head=tmp_path / "task.ckpt",
                               class_colors=["#000000", "#111111", "#222222", "#333333"])
    backbone, _ = load_backbone(files["backbone"])
    x = torch.rand(3, 10, 32, 32)
    with torch.no_grad():
        want = torch.softmax(linear(backbone(x)), dim=-1).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(["probabilities"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert _metadata(onnx_path)["class_colors"][3] == "#333333"


def test_head_of_another_backbone_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    spec = HeadSpec(torch.nn.Linear(100, 2), ["a", "b"])
    with pytest.raises(ExploraGeoError, match="head expects 100 features but the backbone gives 64"):
        export_onnx(files["backbone"], tmp_path / "x.onnx", head=spec)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(files["backbone"]), "--format", "onnx", "--out", str(out),
                 "--head", str(files["head"]), "--no-check"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["model_type"] == "classifier" and line["classes"] == tiny.CLASSES and out.exists()
    assert main(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(out)]) == 2
    assert "none.json does not exist" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(files["backbone"]), "--out", str(tmp_path / "m.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(files["backbone"]), "--out", str(out), "--head", str(files["head"]),
                 "--class-colors", "#ff0000"]) == 2
    err = capsys.readouterr().err
    assert "1 class colours for 3 classes" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("scheme", ["satmae", "meanstd", "reflectance", "none"])
def test_plugin_scaling_matches_library(scheme: str, eurosat_dir: Path) -> None:
    _, scaling = _plugin_core()
    bands = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    norm = Normalization.for_sensor("sentinel2", bands, scheme, offset=100.0)
    x = _eurosat_tiles(eurosat_dir, bands, n=3)
    want = norm(x.astype(np.float64))
    got = scaling.Scaler.from_dict(json.loads(json.dumps(norm.to_dict())))(x.astype(np.uint16))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_plugin_band_names_match_library() -> None:
    bands, _ = _plugin_core()
    for name in ["b2", "B02", "band_2", "Band 2", "b8a", "B8A", "B08A", "band-11", "B1", "b12"]:
        assert bands.canonical_band_name(name) == canonical_band_name(name).upper(), name


def test_backbone_without_gsd_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    for suffix in (".safetensors", ".json"):
        shutil.copy(files["backbone"].with_suffix(suffix), tmp_path / f"nogsd{suffix}")
    sidecar = json.loads((tmp_path / "nogsd.json").read_text())
    sidecar["gsd_m"] = None
    (tmp_path / "nogsd.json").write_text(json.dumps(sidecar))
    with pytest.raises(ExploraGeoError, match="no 'gsd_m' in its sidecar"):
        export_onnx(tmp_path / "nogsd.safetensors", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_finetuned_task_checkpoint_exports_its_own_backbone(files: dict[str, Path], tmp_path: Path) -> None:
    """A head from an ExploraClassificationTask checkpoint comes with the backbone it was trained with."""
    from explora_geo.checkpoint import load_backbone
    from explora_geo.downstream.tasks import ExploraClassificationTask

    task = ExploraClassificationTask(weights=str(files["backbone"]), num_classes=3, labels=["a", "b", "c"])
    with torch.no_grad():  # stands in for full fine-tuning: the backbone no longer equals the file
        torch.manual_seed(0)
        task.model.norm.bias.add_(torch.randn_like(task.model.norm.bias))
        torch.nn.init.normal_(task.model.head.weight, std=1.0)
    task.eval()
    ckpt = tmp_path / "task.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    x = torch.rand(4, 10, 32, 32)
    with torch.no_grad():
        want = torch.softmax(task.model(x), dim=-1).numpy()
        stale = torch.softmax(task.model.head(load_backbone(files["backbone"])[0](x)), dim=-1).numpy()
    assert np.abs(want - stale).max() > 1e-3  # the original backbone would give other probabilities
    for checkpoint, head in ((files["backbone"], ckpt), (ckpt, None)):
        onnx_path, _ = export_onnx(checkpoint, tmp_path / "ft.onnx", head=head)
        got = ort.InferenceSession(str(onnx_path)).run(["probabilities"], {"image": x.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert _metadata(onnx_path)["class_names"] == ["a", "b", "c"]


def test_plain_timm_vit_with_cls4_avg_probe(tmp_path: Path) -> None:
    """A plain timm ViT backbone and a probe head on the last 4 cls tokens + mean patch token."""
    from torch import nn

    from explora_geo.checkpoint import load_backbone, save_backbone
    from explora_geo.downstream.probe import ProbeClassifier, load_head, save_head
    from explora_geo.models import create_backbone

    torch.manual_seed(0)
    kwargs = {"depth": 4, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
    model = create_backbone("vit_tiny_patch16_224", bands=["B04", "B03", "B02", "B08"], img_size=32, **kwargs)
    bands = ["B04", "B03", "B02", "B08"]
    weights, _ = save_backbone(model, tmp_path / "vit", {
        "model_kwargs": {"img_size": 32, "in_chans": 4, **kwargs}, "gsd_m": 10.0, "sensor": "sentinel2",
        "normalization": Normalization.for_sensor("sentinel2", bands, "meanstd").to_dict()})
    head = nn.Linear(48 * 5, 2)
    save_head(head, tmp_path / "head", {"classes": ["x", "y"], "feature_set": "cls4+avg"})
    sidecar_text = (tmp_path / "vit.json").read_text()
    with pytest.raises(ExploraGeoError, match="would overwrite .*vit.json"):  # the backbone's own sidecar
        export_onnx(weights, tmp_path / "vit.onnx", head=tmp_path / "head.safetensors")
    assert (tmp_path / "vit.json").read_text() == sidecar_text and not (tmp_path / "vit.onnx").exists()
    onnx_path, _ = export_onnx(weights, tmp_path / "vit_probe.onnx", head=tmp_path / "head.safetensors")
    export_onnx(weights, onnx_path, head=tmp_path / "head.safetensors")  # re-export over a bundle: fine
    meta = _metadata(onnx_path)
    assert meta["bands"] == bands and meta["wavelengths_nm"] == [664.6, 559.8, 492.4, 832.8]
    backbone, _ = load_backbone(weights)
    linear, head_meta = load_head(tmp_path / "head")
    reference = ProbeClassifier(backbone.eval(), linear, head_meta["n_last_blocks"], head_meta["avgpool"]).eval()
    x = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        want = torch.softmax(reference(x), dim=-1).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(["probabilities"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)

"""``explora-geo export`` of segmentation checkpoints: the ``segmenter`` bundle (per-pixel logits)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from explora_geo.cli import main
from explora_geo.errors import ExploraGeoError
from explora_geo.export import export_onnx

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load("make_tiny_bundle", REPO / "tests" / "plugin" / "make_tiny_bundle.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tinyseg")
    backbone = tiny.build_backbone(out)
    return {"backbone": backbone, "head": tiny.build_head(out), "segmenter": tiny.build_segmenter(out, backbone)}


def _metadata(path: Path) -> dict[str, Any]:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def _reference(ckpt_path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task exactly as Lightning restores it (LoRA not merged), in eval mode."""
    from explora_geo.downstream.segmentation import ExploraSegmentationTask

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt["hyper_parameters"])
    task = ExploraSegmentationTask(weights=None, backbone_meta=hparams["backbone_meta"],
                                   **{k: hparams[k] for k in ("num_classes", "labels", "ignore_index", "mode",
                                                               "n_blocks", "decoder_dim")})
    task.load_state_dict(ckpt["state_dict"])
    return task.eval(), hparams


def test_segmenter_bundle_matches_torch(files: dict[str, Path], tmp_path: Path, t33uuu_dir: Path) -> None:
    import rasterio

    from explora_geo.checkpoint import load_backbone
    from explora_geo.normalization import Normalization

    onnx_path, json_path = export_onnx(files["segmenter"], tmp_path / "seg.onnx")
    meta = _metadata(onnx_path)
    assert meta == json.loads(json_path.read_text())
    assert meta["model_type"] == "segmenter" and meta["outputs"] == ["embedding", "logits"]
    # the ignored 'unlabelled' channel 0 is not exported; names and colours follow the task's
    assert meta["class_names"] == tiny.SEG_CLASSES and meta["class_colors"] == tiny.SEG_COLORS
    assert meta["segmentation"]["channels"] == [1, 2] and meta["segmentation"]["ignore_index"] == 0
    assert (meta["tile_size"], meta["gsd_m"], meta["resolution"]) == (32, 10.0, 1000.0)
    assert meta["bands"] == ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert meta["normalization"]["scheme"] == "satmae" and meta["explora"]["head"] == "segmentation:segmenter.ckpt"
    assert meta["inputs"]["image"] == ["N", 10, 32, 32]

    task, _ = _reference(files["segmenter"])
    # real pixels: 3 tiles of the T33UUU scene (10 m bands at full resolution, 20 m ones read at 10 m)
    tiles = []
    for name in meta["bands"]:
        with rasterio.open(next(t33uuu_dir.glob(f"*_{name}.jp2"))) as src:
            scale = 10.0 / src.res[0]
            window = rasterio.windows.Window(200 * scale, 100 * scale, 96 * scale, 32 * scale)
            tiles.append(src.read(1, window=window, out_shape=(32, 96)).astype(np.float32))
    stack = np.stack(tiles)  # [C, 32, 96]
    x = np.stack([stack[:, :, i * 32:(i + 1) * 32] for i in range(3)])
    x = Normalization.from_dict(meta["normalization"])(x).astype(np.float32)
    with torch.no_grad():
        want_logits = task.model(torch.from_numpy(x))[:, 1:].numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    emb, logits = session.run(["embedding", "logits"], {"image": x})
    assert logits.shape == (3, 2, 32, 32) and emb.shape == (3, 64)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    assert np.abs(logits[:, 0] - logits[:, 1]).max() > 1e-3  # the classes are told apart, not a constant map
    # the embedding is the fine-tuned (LoRA-merged) backbone's, not the original file's
    from explora_geo.downstream.tasks import merge_lora

    with torch.no_grad():
        want_emb = merge_lora(task.model.backbone)(torch.from_numpy(x)).numpy()
        stale = load_backbone(files["backbone"])[0].eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(emb, want_emb, atol=1e-4, rtol=0)
    assert np.abs(emb - stale).max() > 1e-3
    for n in (1, 5):  # dynamic batch
        out = session.run(["logits"], {"image": np.zeros((n, 10, 32, 32), np.float32)})[0]
        assert out.shape == (n, 2, 32, 32)


def test_plain_vit_segmenter_without_ignore_index(tmp_path: Path) -> None:
    """A plain timm ViT segmenter, all channels kept, names from ``labels``, colours from the CLI."""
    from test_downstream_common import make_backbone

    from explora_geo.downstream.segmentation import ExploraSegmentationTask

    weights = make_backbone(tmp_path / "vit", depth=3, architecture="vit_tiny_patch16_224", patch_size=8,
                            in_chans=4)
    task = ExploraSegmentationTask(weights=str(weights), num_classes=3, labels=["a", "b", "c"], n_blocks=2,
                                   decoder_dim=8).eval()
    with torch.no_grad():
        for module in task.model.decoder:
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running statistics
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "seg.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    out = tmp_path / "plain.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--segmenter", "--out", str(out),
                 "--class-colors", "#000000", "#111111", "#222222"]) == 0
    meta = _metadata(out)
    assert meta["class_names"] == ["a", "b", "c"] and meta["class_colors"][2] == "#222222"
    assert meta["segmentation"]["channels"] == [0, 1, 2] and meta["bands"] == ["B02", "B03", "B04", "B08"]
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        want = task.model(x).numpy()
    got = ort.InferenceSession(str(out)).run(["logits"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_segmenter_cli_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from explora_geo.downstream.tasks import ExploraClassificationTask

    out = str(tmp_path / "x.onnx")
    # a backbone file, or a classification checkpoint, is not a segmenter
    _one_line_error(capsys, ["export", "--checkpoint", str(files["backbone"]), "--segmenter", "--out", out],
                    "is not a segmentation checkpoint")
    task = ExploraClassificationTask(weights=str(files["backbone"]), num_classes=2, labels=["a", "b"])
    cls_ckpt = tmp_path / "cls.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, cls_ckpt)
    _one_line_error(capsys, ["export", "--checkpoint", str(cls_ckpt), "--segmenter", "--out", out],
                    "is not a segmentation checkpoint")
    # a segmenter brings its own decoder: no --head, and not as a --head
    _one_line_error(capsys, ["export", "--checkpoint", str(files["segmenter"]), "--head", str(files["head"]),
                             "--out", out], "drop --head")
    _one_line_error(capsys, ["export", "--checkpoint", str(files["backbone"]), "--head", str(files["segmenter"]),
                             "--out", out], "is a segmentation checkpoint, not a classification head")
    _one_line_error(capsys, ["export", "--checkpoint", str(files["segmenter"]), "--out", out,
                             "--class-colors", "#ff0000"], "1 class colours for 2 classes")
    # a corrupt .ckpt
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["export", "--checkpoint", str(tmp_path / "bad.ckpt"), "--segmenter", "--out", out],
                    "cannot read")
    # labels that fit neither all channels nor all but the ignored one
    ckpt = torch.load(files["segmenter"], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["labels"] = ckpt["hyper_parameters"]["class_names"] = ["only"]
    torch.save(ckpt, tmp_path / "labels.ckpt")
    with pytest.raises(ExploraGeoError, match="names 1 classes for 3 output channels"):
        export_onnx(tmp_path / "labels.ckpt", tmp_path / "y.onnx")
    ckpt["hyper_parameters"]["task"] = "multilabel"  # sigmoid outputs: not a softmax class map
    torch.save(ckpt, tmp_path / "labels.ckpt")
    with pytest.raises(ExploraGeoError, match="multilabel segmentation task; only multiclass"):
        export_onnx(tmp_path / "labels.ckpt", tmp_path / "y.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "cls.ckpt", "labels.ckpt"]
    # the CLI's JSON line for a good export
    assert main(["export", "--checkpoint", str(files["segmenter"]), "--out", out, "--no-check"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["model_type"] == "segmenter" and line["classes"] == tiny.SEG_CLASSES


def test_plugin_metadata_rewrite_is_a_valid_onnx_model(files: dict[str, Path], tmp_path: Path) -> None:
    """The plugin rewrites bundle metadata without the onnx package (few-shot bundles); the result passes the
    onnx checker with exactly the new metadata and the same graph."""
    import sys

    sys.path.insert(0, str(REPO / "qgis_plugin"))
    try:
        from explora_geo_qgis.core.onnx_metadata import replace_metadata
    finally:
        sys.path.remove(str(REPO / "qgis_plugin"))
    src, _ = export_onnx(files["segmenter"], tmp_path / "seg.onnx", check=False)
    out = tmp_path / "rewritten.onnx"
    out.write_bytes(replace_metadata(src.read_bytes(), {"model_type": '"classifier"', "x": "[1, 2]"}))
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props} == {"model_type": '"classifier"', "x": "[1, 2]"}
    assert model.graph == onnx.load(str(src)).graph

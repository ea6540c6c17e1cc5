"""The few-shot head: numpy softmax classifier, cross-validation over examples, and head bundles written
without the onnx package (core/linear_head.py, core/onnx_metadata.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from explora_geo_qgis.core.errors import PluginError
from explora_geo_qgis.core.linear_head import (
    LinearHead,
    class_index,
    cross_validate,
    example_folds,
    fit_linear_head,
)
from explora_geo_qgis.core.model import OnnxModel
from explora_geo_qgis.core.onnx_metadata import (
    head_bundle_metadata,
    replace_metadata,
    top_level_fields,
    write_head_bundle,
)


def _blobs(n_per_class: int, centres: np.ndarray, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, centres.shape[1])) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return x, y


def test_fit_separates_classes_and_matches_the_optimum() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 3 + 100.0  # far from 0 and unscaled: standardisation matters
    x, y = _blobs(30, centres, 1.0)
    head = fit_linear_head(x, y, 3, l2=1e-2, iterations=2000, tol=1e-9)
    assert (head.logits(x).argmax(axis=1) == y).mean() == 1.0
    p = head.probabilities(x)
    assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # first-order optimality of the penalised, class-balanced objective (computed here independently)
    z = (x - head.mean) / head.scale
    logits = z @ head.weight.T + head.bias
    q = np.exp(logits - logits.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    onehot = np.eye(3)[y]
    w = 1.0 / (3 * np.bincount(y)[y])
    grad_w = ((q - onehot) * w[:, None]).T @ z + 1e-2 * head.weight
    grad_b = ((q - onehot) * w[:, None]).sum(axis=0)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6


def test_class_balance_counts_each_class_equally() -> None:
    """1 example of class 1 among 50 of class 0: balanced weights still put it on its own side."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(50, 2)), [[4.0, 4.0]]])
    y = np.array([0] * 50 + [1])
    head = fit_linear_head(x, y, 2)
    assert head.logits(x[-1:]).argmax() == 1 and (head.logits(x[:-1]).argmax(axis=1) == 0).mean() > 0.95


def test_cross_validation_holds_out_whole_examples() -> None:
    # 4 examples per class, 5 tiles each; tiles of an example share an offset (as neighbouring tiles do)
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(8), 5)
    labels = np.repeat([0, 0, 0, 0, 1, 1, 1, 1], 5)
    x = rng.normal(size=(40, 6)) * 0.3 + np.where(labels[:, None] == 1, 2.0, -2.0)
    fold = example_folds(groups, labels, 4, seed=0)
    for g in range(8):
        assert len(set(fold[groups == g])) == 1  # an example never straddles folds
    for f in range(4):
        assert set(labels[fold == f]) == {0, 1}  # stratified
    cv = cross_validate(x, labels, groups, 2, folds=5)
    assert cv is not None and cv.folds == 4 and cv.n_tiles == 40 and cv.accuracy == 1.0
    # labels unrelated to the features: held-out accuracy near chance, not the training accuracy
    noise = rng.normal(size=(200, 30))
    noise_labels = np.repeat([0, 1], 100)
    noise_groups = np.arange(200)
    cv_noise = cross_validate(noise, noise_labels, noise_groups, 2)
    train_acc = (fit_linear_head(noise, noise_labels, 2, l2=1e-4).logits(noise).argmax(1) == noise_labels).mean()
    assert cv_noise.accuracy < 0.7 < train_acc
    # a class with a single example cannot be held out
    assert cross_validate(x[:25], labels[:25], groups[:25], 2) is None


def test_class_index_names() -> None:
    names, idx = class_index(["water", "land", "water", "forest"])
    assert names == ["forest", "land", "water"] and idx.tolist() == [2, 1, 2, 0]
    names, idx = class_index([10, 2, 2, 1])
    assert names == ["1", "2", "10"] and idx.tolist() == [2, 1, 1, 0]


def test_head_metadata_round_trip_and_checks() -> None:
    head = LinearHead(np.arange(6.0).reshape(2, 3), np.array([0.5, -0.5]), np.zeros(3), np.ones(3) * 2)
    entry = json.loads(json.dumps(head.to_metadata()))
    back = LinearHead.from_metadata(entry, 3)
    e = np.random.default_rng(0).normal(size=(4, 3))
    np.testing.assert_allclose(back.probabilities(e), head.probabilities(e), atol=1e-6)
    with pytest.raises(PluginError, match="do not fit the embedding"):
        LinearHead.from_metadata(entry, 4)
    with pytest.raises(PluginError, match="unreadable linear_head"):
        LinearHead.from_metadata({"weight": [[1.0]]}, 1)


def test_replace_metadata_keeps_the_network(bundle: dict, tmp_path: Path) -> None:
    """The rewritten file loads in onnxruntime with exactly the new metadata and gives the same outputs."""
    import onnxruntime as ort

    data = bundle["classifier"].read_bytes()
    fields = [f for f, *_ in top_level_fields(data)]
    assert 7 in fields and fields.count(14) > 5  # graph + the exporter's metadata entries
    props = {"model_type": '"embedder"', "note": json.dumps("ünïcode ✓" * 50)}
    out = tmp_path / "m.onnx"
    out.write_bytes(replace_metadata(data, props))
    before = ort.InferenceSession(str(bundle["classifier"]), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert after.get_modelmeta().custom_metadata_map == props
    x = np.random.default_rng(0).normal(size=(3, 10, 32, 32)).astype(np.float32)
    for a, b in zip(before.run(None, {"image": x}), after.run(None, {"image": x})):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        replace_metadata(data[:-3], props)


def test_head_bundle_is_a_classifier_for_the_plugin(bundle: dict, tmp_path: Path) -> None:
    embedder = OnnxModel(bundle["embedder"], device="cpu")
    rng = np.random.default_rng(4)
    head = LinearHead(rng.normal(size=(2, 64)), rng.normal(size=2), rng.normal(size=64), rng.uniform(1, 2, 64))
    meta = head_bundle_metadata(dict(embedder.info.raw), head, ["land", "water"], ["#00ff00", "#0000ff"],
                                {"source": "classify_from_examples"})
    onnx_path, json_path = write_head_bundle(bundle["embedder"], tmp_path / "fewshot.onnx", meta)
    assert json.loads(json_path.read_text()) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewshot.json", "fewshot.onnx"]
    model = OnnxModel(onnx_path, device="cpu")
    assert model.info.is_classifier and model.info.class_names == ("land", "water")
    assert model.info.bands == embedder.info.bands and model.info.gsd_m == embedder.info.gsd_m
    x = rng.normal(size=(5, 10, 32, 32)).astype(np.float32)
    out = model.run(x, ["embedding", "probabilities"])
    emb = embedder.run(x, ["embedding"])["embedding"]
    np.testing.assert_array_equal(out["embedding"], emb)
    np.testing.assert_allclose(out["probabilities"], head.probabilities(emb), atol=1e-6)
    assert model.run(x, ["probabilities"]).keys() == {"probabilities"}
    with pytest.raises(PluginError, match="must end in .onnx"):
        write_head_bundle(bundle["embedder"], tmp_path / "fewshot.gpkg", meta)

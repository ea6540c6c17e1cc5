"""Linear probe + kNN: feature recipe, head grid chosen on validation, kNN, head files, real EuroSAT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from test_downstream_common import make_backbone

from explora_geo.downstream.probe import (
    FEATURE_SETS,
    ProbeClassifier,
    ProbeFeatures,
    block_features,
    confusion_matrix,
    evaluate_probe,
    feature_matrix,
    knn_predict,
    knn_select,
    load_head,
    save_head,
    train_linear_heads,
)
from explora_geo.errors import ExploraGeoError


def _tiny_vit(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, num_classes=0,
                             in_chans=3).eval()


def _blobs(n_per_class: int, k: int = 3, dim: int = 8, n_blocks: int = 4, seed: int = 0,
           spread: float = 0.3) -> ProbeFeatures:
    """Gaussian blobs: class c is centred on 2 * e_c in every block's cls token and in the avg token."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    centres = 2.0 * torch.eye(k, dim)[labels]
    cls = centres[:, None, :] + spread * torch.randn(len(labels), n_blocks, dim, generator=gen)
    avg = centres + spread * torch.randn(len(labels), dim, generator=gen)
    return ProbeFeatures(cls, avg, labels)


def test_block_features_match_the_model_forward() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls, avg = block_features(model, x, n_last=4)
        tokens = model.forward_features(x)  # final norm applied
    assert cls.shape == (2, 4, 192) and avg.shape == (2, 192)
    assert torch.allclose(cls[:, -1], tokens[:, 0], atol=1e-5)
    assert torch.allclose(avg, tokens[:, model.num_prefix_tokens:].mean(1), atol=1e-5)
    assert not torch.allclose(cls[:, 0], cls[:, -1])
    with pytest.raises(ExploraGeoError, match="has 4 blocks"):
        block_features(model, x, n_last=5)


def test_feature_sets_concatenate_cls_tokens_and_avg() -> None:
    feats = _blobs(2, dim=5)
    assert feature_matrix(feats, "cls1").shape == (6, 5)
    assert feature_matrix(feats, "cls4+avg").shape == (6, 25)
    assert torch.equal(feature_matrix(feats, "cls1+avg")[:, 5:], feats.avg)
    assert torch.equal(feature_matrix(feats, "cls1"), feats.cls[:, -1])
    with pytest.raises(ExploraGeoError, match="unknown feature set"):
        feature_matrix(feats, "cls2")


def test_linear_heads_learn_separable_data_and_report_the_whole_grid() -> None:
    train, val = _blobs(30, seed=0), _blobs(10, seed=1)
    choices = train_linear_heads(train, val, 3, epochs=30, batch_size=32)
    assert len(choices) == len(FEATURE_SETS) * 7
    assert choices[0].val_top1 == 1.0
    keys = [(-c.val_top1, c.val_loss) for c in choices]
    assert keys == sorted(keys)
    # a learning rate of 1e-4 for 30 epochs barely moves a head initialised at N(0, 0.01): the grid matters
    lows = [c for c in choices if c.lr == 1e-4]
    assert all(torch.linalg.norm(c.head.weight) < 0.5 for c in lows)


def test_batched_heads_equal_independent_sgd() -> None:
    """Training the bank with lr 1 on lr_h * loss_h is plain SGD with lr_h for head h."""
    train, val = _blobs(8, seed=0), _blobs(4, seed=1)
    (chosen,) = train_linear_heads(train, val, 3, feature_sets=["cls1"], lrs=[0.05], epochs=3, batch_size=7,
                                   seed=5)
    gen = torch.Generator().manual_seed(5)
    weight = torch.empty(8, 3).normal_(0.0, 0.01, generator=gen)
    head = torch.nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.copy_(weight.T)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * 4)
    x = feature_matrix(train, "cls1")
    for _ in range(3):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 7):
            idx = order[start:start + 7]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert torch.allclose(chosen.head.weight, head.weight, atol=1e-6)
    assert torch.allclose(chosen.head.bias, head.bias, atol=1e-6)


def test_head_is_chosen_on_validation_never_on_test() -> None:
    train, val, test = _blobs(20, seed=0), _blobs(6, seed=1), _blobs(6, seed=2)
    classes = ["a", "b", "c"]
    result, head = evaluate_probe(train, val, test, classes, epochs=20)
    shuffled = ProbeFeatures(test.cls, test.avg, test.labels[torch.randperm(len(test.labels))])
    garbled, head2 = evaluate_probe(train, val, shuffled, classes, epochs=20)
    assert result.head["feature_set"] == garbled.head["feature_set"] and result.head["lr"] == garbled.head["lr"]
    assert torch.equal(head.weight, head2.weight)
    assert result.knn["k"] == garbled.knn["k"]
    assert result.top1 == 1.0 and garbled.top1 < 0.8
    assert result.head["val_top1"] == max(g["val_top1"] for g in result.head["grid"])
    assert result.per_class == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert np.trace(np.asarray(result.confusion_matrix)) == len(test.labels)


def test_knn_weighted_vote_and_k_capped_by_train_size() -> None:
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.1, 1.0], [1.0, 0.05]])
    assert knn_predict(train_x, train_y, query, 2, k=1).tolist() == [1, 0]
    # k=3 (all): T=0.07 makes the nearest neighbour dominate the two farther ones of the other class
    assert knn_predict(train_x, train_y, query, 2, k=3).tolist() == [1, 0]
    # a huge temperature turns the vote into a majority: class 0 wins everywhere
    assert knn_predict(train_x, train_y, query, 2, k=3, temperature=1e6).tolist() == [0, 0]
    best, scores = knn_select(train_x, train_y, query, torch.tensor([1, 0]), 2, ks=(10, 20, 100, 200))
    assert list(scores) == [3] and best == 3


def test_confusion_matrix_counts() -> None:
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_head_files_round_trip_and_probe_classifier(tmp_path: Path) -> None:
    model = _tiny_vit()
    head = torch.nn.Linear(192 * 5, 3)
    save_head(head, tmp_path / "head", {"classes": ["a", "b", "c"], "feature_set": "cls4+avg"})
    loaded, meta = load_head(tmp_path / "head.json")
    assert meta["n_last_blocks"] == 4 and meta["avgpool"] is True and meta["classes"] == ["a", "b", "c"]
    assert torch.equal(loaded.weight, head.weight)
    x = torch.randn(2, 3, 32, 32)
    clf = ProbeClassifier(model, loaded, meta["n_last_blocks"], meta["avgpool"])
    with torch.no_grad():
        cls, avg = block_features(model, x, 4)
        expected = head(torch.cat([cls.flatten(1), avg], 1))
        assert torch.allclose(clf(x), expected, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(ExploraGeoError, match="not an explora-geo linear head"):
        load_head(tmp_path / "bad")


def test_random_tiny_group_channel_vit_is_above_chance_on_real_eurosat(eurosat_dir: Path, tmp_path: Path) -> None:
    """Acceptance: a random tiny group-channel ViT, probed on 200 real EuroSAT chips (B8A last in the files)."""
    from explora_geo.checkpoint import load_backbone
    from explora_geo.downstream.probe import probe_backbone

    model, sidecar = load_backbone(make_backbone(tmp_path / "bb", depth=2, img_size=32))
    result = probe_backbone(model, sidecar, eurosat_dir, tmp_path / "out", file_bands="eurosat", epochs=50,
                            progress=False)
    print(f"random tiny group-channel ViT on EuroSAT-200: top1={result.top1:.3f} knn_top1={result.knn_top1:.3f}")
    assert (result.n_train, result.n_val, result.n_test) == (120, 40, 40)
    assert result.top1 > 0.25 and result.knn_top1 > 0.2  # chance is 0.1
    for name in ("probe.json", "confusion_matrix.png", "head.safetensors", "head.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0

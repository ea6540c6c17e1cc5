"""Linear probing and kNN on a frozen backbone: the ExPLoRA / DINOv2 evaluation protocol.

Features (final norm applied): the cls token of the last 1 or 4 blocks, optionally concatenated with the
mean patch token of the last block, giving four feature sets (``cls1``, ``cls1+avg``, ``cls4``,
``cls4+avg``). For each feature set a linear head is trained for every learning rate of a grid
(1e-4 .. 0.1, SGD momentum 0.9, no weight decay, cosine schedule), all heads on the same mini-batches. The
head with the best VALIDATION top-1 is chosen and reported on the test split (never chosen on test).

kNN (weighted voting of the k nearest cosine neighbours, weights ``exp(sim / T)``, T = 0.07, as in DINO):
k in {10, 20, 100, 200} capped by the train size, chosen on validation, reported on test.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explora_geo.atomic import atomic_paths, write_text_atomic
from explora_geo.errors import ExploraGeoError

__all__ = [
    "FEATURE_SETS",
    "LEARNING_RATES",
    "KNN_KS",
    "ProbeFeatures",
    "ProbeClassifier",
    "ProbeResult",
    "block_features",
    "extract_features",
    "feature_matrix",
    "train_linear_heads",
    "knn_predict",
    "knn_select",
    "confusion_matrix",
    "per_class_accuracy",
    "evaluate_probe",
    "save_confusion_png",
    "save_head",
    "load_head",
]

#: feature set name -> (number of last blocks whose cls token is used, append the mean patch token)
FEATURE_SETS: dict[str, tuple[int, bool]] = {
    "cls1": (1, False),
    "cls1+avg": (1, True),
    "cls4": (4, False),
    "cls4+avg": (4, True),
}
#: learning-rate grid of the linear heads (1e-4 .. 0.1)
LEARNING_RATES: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: k values of the kNN classifier (capped by the train size)
KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE: float = 0.07


@dataclass
class ProbeFeatures:
    """Frozen-backbone features of a set of images.

    Args:
        cls: cls tokens of the last ``n`` blocks, final norm applied, oldest block first: ``[N, n, D]``.
        avg: mean patch token of the last block, final norm applied: ``[N, D]``.
        labels: class indices ``[N]`` (int64).
    """

    cls: Tensor
    avg: Tensor
    labels: Tensor

    def subset(self, idx: Sequence[int] | np.ndarray | Tensor) -> ProbeFeatures:
        """The rows ``idx``."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ProbeFeatures(self.cls[idx], self.avg[idx], self.labels[idx])


def block_features(model: nn.Module, x: Tensor, n_last: int = 4) -> tuple[Tensor, Tensor]:
    """cls tokens of the last ``n_last`` blocks and the mean patch token of the last block.

    Uses the timm ViT API ``get_intermediate_layers(x, n, return_prefix_tokens=True, norm=True)``, which plain
    timm ViTs and our group-channel ViT share.

    Args:
        model: a timm-style ViT.
        x: images ``[B, C, H, W]`` (already normalised, model band order).
        n_last: how many last blocks.

    Returns:
        ``(cls [B, n_last, D], avg [B, D])``.
    """
    depth = len(getattr(model, "blocks", ()))
    if depth and n_last > depth:
        raise ExploraGeoError(f"the backbone has {depth} blocks; cannot take the cls token of the last {n_last}.")
    outs = model.get_intermediate_layers(x, n=n_last, return_prefix_tokens=True, norm=True)
    cls = torch.stack([prefix[:, 0] for _, prefix in outs], dim=1)
    avg = outs[-1][0].mean(dim=1)
    return cls, avg


def feature_matrix(feats: ProbeFeatures, name: str) -> Tensor:
    """The linear-probe input of feature set ``name`` (see :data:`FEATURE_SETS`): ``[N, F]``."""
    if name not in FEATURE_SETS:
        raise ExploraGeoError(f"unknown feature set {name!r}; choose one of {', '.join(FEATURE_SETS)}.")
    n, use_avg = FEATURE_SETS[name]
    if n > feats.cls.shape[1]:
        raise ExploraGeoError(f"feature set {name} needs {n} blocks; only {feats.cls.shape[1]} were extracted.")
    parts = [feats.cls[:, -n:].flatten(1)]
    if use_avg:
        parts.append(feats.avg)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    n_last: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    total: int | None = None,
) -> ProbeFeatures:
    """Run the frozen ``model`` over ``batches`` (``{"image", "label"}`` dicts) with a progress bar."""
    from tqdm.auto import tqdm

    model.eval().to(device)
    cls_parts, avg_parts, labels = [], [], []
    for batch in tqdm(batches, desc="features", unit="batch", disable=not progress, total=total):
        cls, avg = block_features(model, batch["image"].to(device), n_last)
        cls_parts.append(cls.float().cpu())
        avg_parts.append(avg.float().cpu())
        labels.append(batch["label"].cpu())
    if not labels:
        raise ExploraGeoError("no images to extract features from; check the labelled data folder.")
    return ProbeFeatures(torch.cat(cls_parts), torch.cat(avg_parts), torch.cat(labels).long())


@dataclass
class HeadChoice:
    """One trained linear head of the grid and its validation accuracy."""

    feature_set: str
    lr: float
    val_top1: float
    val_loss: float
    head: nn.Linear = field(repr=False)


def train_linear_heads(
    train: ProbeFeatures,
    val: ProbeFeatures,
    num_classes: int,
    *,
    feature_sets: Sequence[str] = tuple(FEATURE_SETS),
    lrs: Sequence[float] = LEARNING_RATES,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> list[HeadChoice]:
    """Train the grid of linear heads (every feature set x every learning rate) on the same mini-batches.

    SGD (momentum 0.9, no weight decay) with a cosine schedule over all steps; heads start at
    ``N(0, 0.01)`` weights and zero bias. Returns every head with its validation top-1 (fraction) and
    cross-entropy, sorted best first: highest top-1, ties broken by the lower loss. Deterministic for a
    given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = {name: feature_matrix(train, name) for name in feature_sets}
    rates = torch.tensor(list(lrs), dtype=torch.float32)
    # One bank of len(lrs) heads per feature set: weights [H, F, K], biases [H, K]. Plain SGD with momentum
    # and no weight decay is linear in the gradient, so training every head with lr 1 on lr_h * loss_h is
    # exactly training head h with learning rate lr_h; the cosine factor is shared.
    banks: dict[str, tuple[Tensor, Tensor]] = {}
    for name in feature_sets:
        weight = torch.empty(len(lrs), inputs[name].shape[1], num_classes).normal_(0.0, 0.01, generator=gen)
        banks[name] = (weight.requires_grad_(), torch.zeros(len(lrs), num_classes, requires_grad=True))
    optim = torch.optim.SGD([t for bank in banks.values() for t in bank], lr=1.0, momentum=0.9,
                            weight_decay=0.0)
    n = len(train.labels)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start: start + batch_size]
            y = train.labels[idx]
            loss = torch.zeros(())
            for name, (weight, bias) in banks.items():
                logits = torch.einsum("nf,hfk->hnk", inputs[name][idx], weight) + bias[:, None]
                per_head = nn.functional.cross_entropy(
                    logits.reshape(-1, num_classes), y.repeat(len(lrs)), reduction="none"
                ).reshape(len(lrs), -1).mean(1)
                loss = loss + (rates * per_head).sum()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
    choices = []
    with torch.no_grad():
        for name, (weight, bias) in banks.items():
            for h, lr in enumerate(lrs):
                head = nn.Linear(weight.shape[1], num_classes)
                head.weight.copy_(weight[h].T)
                head.bias.copy_(bias[h])
                logits = head(feature_matrix(val, name))
                choices.append(HeadChoice(name, float(lr), float((logits.argmax(1) == val.labels).float().mean()),
                                          float(nn.functional.cross_entropy(logits, val.labels)), head.eval()))
    return sorted(choices, key=lambda c: (-c.val_top1, c.val_loss))


def knn_predict(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int, k: int,
                temperature: float = KNN_TEMPERATURE) -> Tensor:
    """Weighted kNN on cosine similarity (DINO): votes ``exp(sim / T)`` of the ``k`` nearest train samples.

    Args:
        train_x: ``[N, F]`` train features; train_y: ``[N]`` classes; query_x: ``[M, F]``.

    Returns:
        predicted classes ``[M]``.
    """
    k = min(k, len(train_y))
    sim = nn.functional.normalize(query_x, dim=1) @ nn.functional.normalize(train_x, dim=1).T
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(len(query_x), num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, train_y[top_idx], weights)
    return votes.argmax(1)


def knn_select(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
               ks: Sequence[int] = KNN_KS) -> tuple[int, dict[int, float]]:
    """Choose k on validation. Returns ``(best k, {k: val top-1})`` over ``ks`` capped by the train size."""
    capped = sorted({min(k, len(train_y)) for k in ks})
    scores = {k: float((knn_predict(train_x, train_y, val_x, num_classes, k) == val_y).float().mean())
              for k in capped}
    best = max(capped, key=lambda k: (scores[k], -k))
    return best, scores


def confusion_matrix(y_true: Tensor, y_pred: Tensor, num_classes: int) -> np.ndarray:
    """``[K, K]`` counts, rows = true class, columns = predicted class."""
    cm = torch.zeros(num_classes * num_classes, dtype=torch.long)
    cm.index_add_(0, y_true.long() * num_classes + y_pred.long(), torch.ones_like(y_true, dtype=torch.long))
    return cm.reshape(num_classes, num_classes).numpy()


def per_class_accuracy(cm: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """Recall of each class from a confusion matrix (``None`` for a class absent from the split)."""
    totals = cm.sum(axis=1)
    return {c: (float(cm[i, i] / totals[i]) if totals[i] else None) for i, c in enumerate(classes)}


def save_confusion_png(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike[str],
                       title: str = "linear probe, test split") -> Path:
    """Write the confusion matrix as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    peak = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > peak / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_paths(path) as (tmp,):
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------
# The chosen head: files and a backbone + head classifier
# --------------------------------------------------------------------------------------------------------

HEAD_FORMAT = "explora-geo-linear-head"


def save_head(head: nn.Linear, path: str | os.PathLike[str], meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (``weight [K, F]``, ``bias [K]``) and ``<path>.json``.

    ``meta`` must give ``classes`` and ``feature_set``; it is stored with the format tag and the head's
    ``n_last_blocks`` / ``avgpool`` recipe (what :class:`ProbeClassifier` needs to rebuild the features).
    """
    from safetensors.torch import save_file

    if "classes" not in meta or "feature_set" not in meta:
        raise ValueError("head metadata needs 'classes' and 'feature_set'")
    n_last, avgpool = FEATURE_SETS[meta["feature_set"]]
    base = Path(path)
    weights, sidecar = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
    doc = {"format": HEAD_FORMAT, "format_version": 1, "n_last_blocks": n_last, "avgpool": avgpool,
           "in_features": head.in_features, "num_classes": head.out_features, **meta}
    with atomic_paths(weights, sidecar) as (tmp_w, tmp_j):
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, tmp_w,
                  metadata={"format": HEAD_FORMAT})
        tmp_j.write_text(json.dumps(doc, indent=2))
    return weights, sidecar


def load_head(path: str | os.PathLike[str]) -> tuple[nn.Linear, dict[str, Any]]:
    """Inverse of :func:`save_head`; ``path`` may name the ``.safetensors``, the ``.json`` or their stem."""
    from safetensors.torch import load_file

    from explora_geo.checkpoint import backbone_paths

    weights, sidecar = backbone_paths(path)  # the same file-pair naming as backbone files
    for f in (weights, sidecar):
        if not f.is_file():
            raise ExploraGeoError(f"probe head file {f} does not exist; run `explora-geo probe` to create it.")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise ExploraGeoError(f"{sidecar} is not an explora-geo linear head (format {meta.get('format')!r}).")
    tensors = load_file(weights)
    head = nn.Linear(meta["in_features"], meta["num_classes"])
    head.load_state_dict(tensors, strict=True)
    return head.eval(), meta


class ProbeClassifier(nn.Module):
    """Frozen backbone + linear probe head: images ``[B, C, H, W]`` -> logits ``[B, K]``.

    Rebuilds the head's feature recipe (cls token of the last ``n_last_blocks`` blocks, optionally with the
    mean patch token) so the pair can be traced / exported as one graph.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, n_last_blocks: int, avgpool: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool

    def features(self, x: Tensor) -> Tensor:
        """Probe features ``[B, F]`` of images ``x``."""
        cls, avg = block_features(self.backbone, x, self.n_last_blocks)
        parts = [cls.flatten(1)] + ([avg] if self.avgpool else [])
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class ProbeResult:
    """What ``explora-geo probe`` reports (test numbers of heads chosen on validation)."""

    top1: float
    knn_top1: float
    per_class: dict[str, float | None]
    head: dict[str, Any]
    knn: dict[str, Any]
    n_train: int
    n_val: int
    n_test: int
    classes: list[str]
    confusion_matrix: list[list[int]]

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(asdict(self), separators=(",", ":"))


def evaluate_probe(
    train: ProbeFeatures,
    val: ProbeFeatures,
    test: ProbeFeatures,
    classes: Sequence[str],
    *,
    lrs: Sequence[float] = LEARNING_RATES,
    feature_sets: Sequence[str] | None = None,
    ks: Sequence[int] = KNN_KS,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[ProbeResult, nn.Linear]:
    """The full protocol on extracted features: head grid + kNN, chosen on ``val``, reported on ``test``.

    Returns the result and the chosen head (its feature set is ``result.head["feature_set"]``).
    """
    k = len(classes)
    if feature_sets is None:
        feature_sets = [n for n, (blocks, _) in FEATURE_SETS.items() if blocks <= train.cls.shape[1]]
    choices = train_linear_heads(train, val, k, feature_sets=feature_sets, lrs=lrs, epochs=epochs,
                                 batch_size=batch_size, seed=seed)
    best = choices[0]
    with torch.no_grad():
        pred = best.head(feature_matrix(test, best.feature_set)).argmax(1)
    cm = confusion_matrix(test.labels, pred, k)
    knn_x = {split: feature_matrix(f, "cls1") for split, f in (("train", train), ("val", val), ("test", test))}
    best_k, knn_val = knn_select(knn_x["train"], train.labels, knn_x["val"], val.labels, k, ks)
    knn_pred = knn_predict(knn_x["train"], train.labels, knn_x["test"], k, best_k)
    result = ProbeResult(
        top1=float((pred == test.labels).float().mean()),
        knn_top1=float((knn_pred == test.labels).float().mean()),
        per_class=per_class_accuracy(cm, classes),
        head={"feature_set": best.feature_set, "lr": best.lr, "val_top1": best.val_top1,
              "val_loss": best.val_loss,
              "grid": [{"feature_set": c.feature_set, "lr": c.lr, "val_top1": c.val_top1, "val_loss": c.val_loss}
                       for c in choices]},
        knn={"k": best_k, "temperature": KNN_TEMPERATURE, "features": "cls1",
             "val_top1": {str(kk): v for kk, v in knn_val.items()}},
        n_train=len(train.labels), n_val=len(val.labels), n_test=len(test.labels),
        classes=list(classes), confusion_matrix=cm.tolist(),
    )
    return result, best.head


# --------------------------------------------------------------------------------------------------------
# The whole protocol on a backbone and a chip folder (what `explora-geo probe` runs)
# --------------------------------------------------------------------------------------------------------

def probe_backbone(
    model: nn.Module,
    sidecar: dict[str, Any],
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    file_bands: str | Sequence[str] | None = None,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    batch_size: int = 64,
    epochs: int = 100,
    lrs: Sequence[float] = LEARNING_RATES,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> ProbeResult:
    """Linear probe + kNN of a frozen backbone on a chip folder; writes results into ``out_dir``.

    The chips are read in the backbone's band order (picked by name), scaled with the sidecar
    normalisation and resized to its ``img_size``; features are extracted once (progress bar); the split
    is seeded and stratified. Written: ``probe.json`` (the full result), ``confusion_matrix.png`` (test
    split, chosen head), ``head.safetensors`` + ``head.json`` (chosen head, class names, feature recipe).

    Raises:
        ExploraGeoError: bad data folder (empty class, single class), band mismatch (names the bands).
    """
    from torch.utils.data import DataLoader

    from explora_geo.downstream.backbones import sidecar_img_size, sidecar_normalization
    from explora_geo.downstream.labeled import ChipDataset, scan_chip_folder, stratified_split

    if len(split) != 3 or split[1] <= 0 or split[2] <= 0:
        raise ExploraGeoError(f"the probe needs validation and test splits (the head is chosen on validation, "
                              f"reported on test); got fractions {tuple(split)}, e.g. use 0.6,0.2,0.2.")
    index = scan_chip_folder(data)
    train_idx, val_idx, test_idx = stratified_split(index.labels, split, seed=seed)
    dataset = ChipDataset(index, bands=sidecar["bands"], file_bands=file_bands,
                          normalization=sidecar_normalization(sidecar), img_size=sidecar_img_size(sidecar))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    depth = len(getattr(model, "blocks", ())) or 4
    feats = extract_features(model, loader, n_last=min(4, depth), device=device, progress=progress,
                             total=len(loader))
    result, head = evaluate_probe(feats.subset(train_idx), feats.subset(val_idx), feats.subset(test_idx),
                                  index.classes, lrs=lrs, epochs=epochs, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_confusion_png(np.asarray(result.confusion_matrix), index.classes, out / "confusion_matrix.png",
                       title=f"linear probe ({result.head['feature_set']}, lr {result.head['lr']:g}), test split: "
                             f"top-1 {result.top1:.3f}")
    save_head(head, out / "head", {
        "classes": list(index.classes), "feature_set": result.head["feature_set"], "lr": result.head["lr"],
        "val_top1": result.head["val_top1"], "test_top1": result.top1, "bands": list(sidecar["bands"]),
        "architecture": sidecar.get("architecture"), "split": list(split), "seed": seed,
    })
    write_text_atomic(out / "probe.json", json.dumps(asdict(result), indent=2))
    return result

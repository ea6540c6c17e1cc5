"""A linear (softmax) classifier on tile embeddings, fitted in numpy: the few-shot head.

``classify_from_examples`` embeds the tiles under the analyst's examples and fits

    p(class | e) = softmax(W ((e - mean) / scale) + b)

by multinomial logistic regression: class-balanced cross-entropy plus an L2 penalty ``l2 * |W|^2 / 2``,
minimised by Nesterov-accelerated gradient descent with the step ``1 / L`` from the loss's Lipschitz bound (a
convex problem, so the result does not depend on a random start). ``mean`` / ``scale`` standardise each
embedding dimension with the training examples' statistics. Cross-validation holds out whole examples (a
polygon's tiles stay together), stratified by class. The head travels inside a bundle's metadata
(``linear_head``, see :meth:`LinearHead.to_metadata`) and the plugin applies it to the ``embedding`` output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PluginError


@dataclass(frozen=True)
class LinearHead:
    """``embedding [N, D]`` -> ``probabilities [N, K]``.

    Attributes:
        weight: ``[K, D]`` float64.
        bias: ``[K]``.
        mean, scale: ``[D]`` standardisation of the embedding (``(e - mean) / scale``).
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        """``[..., D]`` -> ``[..., K]`` float64."""
        z = (np.asarray(embedding, np.float64) - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def probabilities(self, embedding: np.ndarray) -> np.ndarray:
        """``[..., D]`` -> ``[..., K]`` float32 softmax probabilities (NaN rows stay NaN)."""
        logits = self.logits(embedding)
        logits -= logits.max(axis=-1, keepdims=True)
        np.exp(logits, out=logits)
        return (logits / logits.sum(axis=-1, keepdims=True)).astype(np.float32)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready ``linear_head`` metadata entry (float32 precision is plenty for inference)."""
        def as_list(a: np.ndarray) -> list:
            return np.asarray(a, np.float32).tolist()

        return {"input": "embedding", "activation": "softmax", "in_features": self.in_features,
                "num_classes": self.n_classes, "weight": as_list(self.weight), "bias": as_list(self.bias),
                "mean": as_list(self.mean), "scale": as_list(self.scale)}

    @classmethod
    def from_metadata(cls, entry: Mapping[str, Any], embedding_dim: int, source: str = "the model") -> LinearHead:
        """Parse :meth:`to_metadata` output, checking the shapes against the bundle's ``embedding_dim``."""
        try:
            weight = np.asarray(entry["weight"], np.float64)
            bias = np.asarray(entry["bias"], np.float64)
            mean = np.asarray(entry["mean"], np.float64)
            scale = np.asarray(entry["scale"], np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise PluginError(f"{source} has an unreadable linear_head ({err}); re-create it with "
                              "classify_from_examples.") from err
        d = embedding_dim
        if weight.ndim != 2 or weight.shape[1] != d or bias.shape != weight.shape[:1] or mean.shape != (d,) \
                or scale.shape != (d,) or not (scale > 0).all():
            raise PluginError(f"{source}: linear_head shapes {weight.shape}, {bias.shape}, {mean.shape}, "
                              f"{scale.shape} do not fit the embedding ({d}); re-create it with "
                              "classify_from_examples.")
        return cls(weight, bias, mean, scale)


def fit_linear_head(features: np.ndarray, labels: np.ndarray, n_classes: int, *, l2: float = 1e-2,
                    iterations: int = 500, tol: float = 1e-7) -> LinearHead:
    """Fit a softmax classifier to ``features`` ``[N, D]`` with integer ``labels`` ``[N]`` in ``0..K-1``.

    Class-balanced (each class weighs the same in total), L2-penalised (``l2``, on standardised features),
    full-batch Nesterov gradient descent; stops when the gradient's largest entry is below ``tol``.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"features [N, D] and labels [N] expected, got {x.shape} and {y.shape}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    n, d = z.shape
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    sample_w = (1.0 / (present.sum() * counts[y]))  # sums to 1, equal total per present class
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0
    zb = np.hstack([z, np.ones((n, 1))])  # bias as a last, unpenalised column
    # Lipschitz bound of the weighted softmax cross-entropy gradient: 0.5 * lambda_max(Z^T diag(w) Z) + l2
    gram = zb.T @ (zb * sample_w[:, None])
    lipschitz = 0.5 * float(np.linalg.eigvalsh(gram)[-1]) + l2
    step = 1.0 / lipschitz
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0
    theta = np.zeros((d + 1, n_classes))
    momentum = theta.copy()
    t = 1.0
    for _ in range(iterations):
        logits = zb @ momentum
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = zb.T @ ((p - onehot) * sample_w[:, None]) + l2 * penalty[:, None] * momentum
        new_theta = momentum - step * grad
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        momentum = new_theta + ((t - 1.0) / t_next) * (new_theta - theta)
        theta, t = new_theta, t_next
        if np.abs(grad).max() < tol:
            break
    return LinearHead(theta[:-1].T.copy(), theta[-1].copy(), mean, scale)


@dataclass(frozen=True)
class CrossValidation:
    """Held-out accuracy of :func:`fit_linear_head` over folds of whole examples.

    Attributes:
        accuracy: fraction of held-out tiles classified right (all folds pooled).
        balanced_accuracy: mean over classes of the per-class held-out recall.
        folds: number of folds.
        per_class: recall of each class (NaN for a class never held out).
        n_tiles: held-out tiles in all.
    """

    accuracy: float
    balanced_accuracy: float
    folds: int
    per_class: tuple[float, ...]
    n_tiles: int


def example_folds(groups: np.ndarray, labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold (``0..folds-1``) of each sample, ``[N]``: examples (``groups``) are dealt to folds round-robin within
    each class, in a seeded random order, so every fold holds examples of every class that has ``folds`` or
    more."""
    groups = np.asarray(groups)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold_of_group: dict[Any, int] = {}
    for k in np.unique(labels):
        ids = np.unique(groups[labels == k])
        for i, g in enumerate(rng.permutation(ids)):
            fold_of_group.setdefault(g.item() if hasattr(g, "item") else g, i % folds)
    return np.array([fold_of_group[g.item() if hasattr(g, "item") else g] for g in groups], np.int64)


def cross_validate(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int, *,
                   folds: int = 5, seed: int = 0, **fit_kwargs: Any) -> CrossValidation | None:
    """Stratified cross-validation over whole examples; ``None`` when some class has fewer than 2 examples
    (nothing could be held out for it).

    Args:
        features: ``[N, D]`` tile embeddings.
        labels: ``[N]`` class of each tile.
        groups: ``[N]`` the example (feature id) each tile comes from.
        folds: at most this many folds (fewer when a class has fewer examples).
    """
    labels = np.asarray(labels, np.int64)
    groups = np.asarray(groups)
    per_class_examples = [len(np.unique(groups[labels == k])) for k in range(n_classes)]
    smallest = min(per_class_examples)
    if smallest < 2:
        return None
    folds = max(2, min(folds, smallest))
    fold = example_folds(groups, labels, folds, seed)
    predicted = np.full(labels.shape, -1, np.int64)
    for f in range(folds):
        test = fold == f
        if not test.any():
            continue
        head = fit_linear_head(features[~test], labels[~test], n_classes, **fit_kwargs)
        predicted[test] = head.logits(features[test]).argmax(axis=1)
    right = predicted == labels
    recalls = tuple(float(right[labels == k].mean()) if (labels == k).any() else float("nan")
                    for k in range(n_classes))
    return CrossValidation(float(right.mean()), float(np.nanmean(recalls)), folds, recalls, int(labels.size))


def class_index(values: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """Class names (the distinct values as text, sorted; numbers numerically) and each value's class index."""
    texts = [str(v) for v in values]
    distinct = sorted(set(texts), key=_natural_key)
    lookup = {name: i for i, name in enumerate(distinct)}
    return distinct, np.array([lookup[t] for t in texts], np.int64)


def _natural_key(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)

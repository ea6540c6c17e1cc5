"""k-means on tile embeddings, in numpy: the unsupervised map of ``explora_geo:cluster``.

Lloyd's algorithm from k-means++ starts (each next centre drawn with probability proportional to the squared
distance to the nearest centre chosen so far), several seeded restarts, the lowest within-cluster sum of
squares kept. Distances are computed in float64 in row chunks, so memory stays ``chunk x k`` whatever the
number of tiles. A cluster that empties is restarted on the point farthest from its centre. Clusters are
numbered by size, largest first, so the same data and seed always give the same numbering and colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PluginError

_CHUNK = 65536  # rows per distance block: 65536 x k float64


@dataclass(frozen=True)
class KMeansResult:
    """A k-means fit.

    Attributes:
        labels: ``[N]`` int32 cluster of each point, 0 = the largest cluster.
        centroids: ``[k, D]`` float64 cluster centres, in label order.
        inertia: sum of squared distances of the points to their centres (embedding units squared).
        iterations: Lloyd iterations of the kept restart.
    """

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    iterations: int

    @property
    def sizes(self) -> np.ndarray:
        """``[k]`` points per cluster."""
        return np.bincount(self.labels, minlength=len(self.centroids))


def _nearest(x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each row of ``x`` ``[N, D]`` and the squared distance to it (``x_sq`` = ``|x|^2``)."""
    c_sq = np.einsum("kd,kd->k", centres, centres)
    labels = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float64)
    for start in range(0, len(x), _CHUNK):
        block = x[start:start + _CHUNK]
        d = x_sq[start:start + _CHUNK, None] - 2.0 * block @ centres.T + c_sq[None, :]
        labels[start:start + _CHUNK] = d.argmin(axis=1)
        dist[start:start + _CHUNK] = d[np.arange(len(block)), labels[start:start + _CHUNK]]
    return labels, np.maximum(dist, 0.0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` starting centres ``[k, D]`` drawn from the rows of ``x`` by k-means++ (float64 ``x``)."""
    x_sq = np.einsum("nd,nd->n", x, x)
    # |x|^2 - 2 x.c + |c|^2 leaves rounding residue where x == c: below this, a point is one of the centres
    same = 1e-10 * max(float(x_sq.max()), 1e-300)
    centres = [x[rng.integers(len(x))]]
    _, dist = _nearest(x, x_sq, np.asarray(centres))
    for _ in range(1, k):
        dist[dist <= same] = 0.0
        total = dist.sum()
        if total <= 0:  # every point coincides with a chosen centre: fewer distinct points than k
            raise PluginError(f"cannot make {k} clusters from {len(centres)} distinct tile embedding(s) "
                              f"({len(x)} tiles); choose at most {len(centres)} clusters or a larger area.")
        centres.append(x[rng.choice(len(x), p=dist / total)])
        _, d_new = _nearest(x, x_sq, centres[-1][None])
        dist = np.minimum(dist, d_new)
    return np.asarray(centres)


def _lloyd(x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray, max_iter: int, tol: float,
           ) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd iterations until no label changes or the centres move less than ``tol`` (relative)."""
    k = len(centres)
    labels, dist = _nearest(x, x_sq, centres)
    scale = max(float(np.mean(np.var(x, axis=0))), 1e-30)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        for empty in np.flatnonzero(counts == 0):  # restart an empty cluster on the worst-fitted point
            far = int(dist.argmax())
            new[empty] = x[far]
            dist[far] = 0.0
        shift = float(((new - centres) ** 2).sum(axis=1).max())
        centres = new
        new_labels, dist = _nearest(x, x_sq, centres)
        stable = np.array_equal(new_labels, labels)
        labels = new_labels
        if stable or shift <= tol * scale:
            break
    return labels, centres, float(dist.sum()), iteration


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           tol: float = 1e-6) -> KMeansResult:
    """Cluster the rows of ``x`` ``[N, D]`` into ``k`` clusters (Euclidean k-means).

    Args:
        x: ``[N, D]`` points (e.g. tile embeddings); must be finite.
        k: number of clusters, at least 2 and at most the number of distinct points.
        seed: seeds the k-means++ starts; the same seed gives the same result.
        n_init: restarts; the one with the lowest inertia is kept.
        max_iter: Lloyd iterations per restart.
        tol: stop when no centre moves more than ``tol`` x the mean per-dimension variance (squared).

    Raises:
        PluginError: ``k`` below 2 or above the number of distinct points, or non-finite points.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise PluginError("k-means: some embeddings are not finite; leave the skipped tiles out.")
    if k < 2:
        raise PluginError(f"number of clusters {k} must be at least 2.")
    x_sq = np.einsum("nd,nd->n", x, x)
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float, int] | None = None
    for _ in range(max(1, n_init)):
        fit = _lloyd(x, x_sq, kmeans_plus_plus(x, k, rng), max_iter, tol)
        if best is None or fit[2] < best[2]:
            best = fit
    labels, centres, inertia, iterations = best
    order = np.lexsort((np.arange(k), -np.bincount(labels, minlength=k)))  # largest first, ties by index
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return KMeansResult(rank[labels].astype(np.int32), centres[order], inertia, iterations)

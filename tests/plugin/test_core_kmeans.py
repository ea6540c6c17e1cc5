"""k-means on embeddings (core/kmeans.py): k-means++ starts, seeded, clusters numbered by size."""

from __future__ import annotations

import numpy as np
import pytest
from explora_geo_qgis.core import kmeans as kmeans_module
from explora_geo_qgis.core.errors import PluginError
from explora_geo_qgis.core.kmeans import kmeans, kmeans_plus_plus


def _blobs(sizes: list[int], dim: int = 16, spread: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 5.0 + 40.0  # far from the origin, like raw embeddings
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), y[perm]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_well_separated_blobs_are_recovered_and_numbered_by_size() -> None:
    sizes = [40, 200, 10, 90, 25]
    x, y = _blobs(sizes)
    fit = kmeans(x, 5, seed=3)
    assert _same_partition(fit.labels, y)
    assert fit.sizes.tolist() == sorted(sizes, reverse=True)  # 0 = largest cluster
    for label in range(5):  # centroids are the members' means
        np.testing.assert_allclose(fit.centroids[label], x[fit.labels == label].mean(axis=0), rtol=1e-6)
    assert fit.inertia == pytest.approx(((x - fit.centroids[fit.labels]) ** 2).sum(), rel=1e-6)


def test_same_seed_same_result_and_chunked_distances_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = _blobs([30, 30, 30, 30], dim=8, spread=2.0, seed=1)  # overlapping: the start matters
    a, b = kmeans(x, 4, seed=7), kmeans(x, 4, seed=7)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centroids, b.centroids)
    monkeypatch.setattr(kmeans_module, "_CHUNK", 7)  # distances in 7-row blocks
    c = kmeans(x, 4, seed=7)
    assert np.array_equal(a.labels, c.labels)
    np.testing.assert_allclose(a.centroids, c.centroids, rtol=1e-10)


def test_kmeans_plus_plus_spreads_its_starts() -> None:
    x, y = _blobs([50] * 6, dim=4, spread=0.1, seed=2)
    starts = kmeans_plus_plus(x.astype(np.float64), 6, np.random.default_rng(0))
    # one start per blob: each start's nearest blob differs
    nearest = [y[np.argmin(((x - s) ** 2).sum(axis=1))] for s in starts]
    assert sorted(nearest) == list(range(6))


def test_restarts_keep_the_lowest_inertia() -> None:
    x, _ = _blobs([40] * 8, dim=2, spread=1.0, seed=5)  # 8 overlapping blobs in 2-D: local optima abound
    single = [kmeans(x, 8, seed=s, n_init=1).inertia for s in range(10)]
    assert max(single) > 1.2 * min(single)  # single starts do land in worse optima here
    assert kmeans(x, 8, seed=0, n_init=10).inertia <= min(single) * (1 + 1e-9)


def test_duplicates_and_bad_k_give_one_line_errors() -> None:
    x = np.repeat(np.eye(3, 5), 10, axis=0)  # 3 distinct points, 10 copies each
    fit = kmeans(x, 3)
    assert fit.sizes.tolist() == [10, 10, 10] and fit.inertia == pytest.approx(0.0)
    with pytest.raises(PluginError, match=r"cannot make 4 clusters from 3 distinct .*choose at most 3") as err:
        kmeans(x, 4)
    assert "\n" not in str(err.value)
    # distinct points far from the origin: the distance expansion leaves rounding residue, not exact zeros
    far = np.repeat(np.random.default_rng(0).normal(size=(4, 64)) + 300.0, 3, axis=0)
    assert kmeans(far, 4).sizes.tolist() == [3, 3, 3, 3]
    with pytest.raises(PluginError, match="cannot make 5 clusters from 4 distinct"):
        kmeans(far, 5)
    with pytest.raises(PluginError, match="at least 2"):
        kmeans(x, 1)
    with pytest.raises(PluginError, match="not finite"):
        kmeans(np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]), 2)

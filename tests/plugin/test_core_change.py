"""The change score between two dates' tile embeddings (core/change.py): centred cosine distance."""

from __future__ import annotations

import numpy as np
import pytest
from explora_geo_qgis.core.change import change_score
from explora_geo_qgis.core.errors import PluginError


def _scene(rows: int = 12, cols: int = 16, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, cols, dim)) + 50.0).astype(np.float32)  # raw embeddings share a big mean


def test_changed_block_scores_highest_despite_a_scene_wide_shift() -> None:
    before = _scene()
    rng = np.random.default_rng(1)
    after = before + rng.normal(size=before.shape[-1]).astype(np.float32) * 3.0  # season: the same everywhere
    after += 0.05 * rng.normal(size=before.shape).astype(np.float32)  # sensor noise
    after[3:6, 8:12] = _scene(3, 4, seed=2)  # the block that really changed
    ran = np.ones(before.shape[:2], bool)
    score = change_score(before, after, ran, ran)
    assert score.dtype == np.float32 and score.shape == ran.shape
    block = np.zeros_like(ran)
    block[3:6, 8:12] = True
    assert score[block].min() > score[~block].max()
    assert set(np.argsort(score, axis=None)[-12:]) == set(np.flatnonzero(block))
    assert score[~block].max() < 0.05 and score[block].min() > 0.5
    # uncentred, the same distances are all ~0: the big shared mean hides the change
    cosine = (before * after).sum(-1) / np.linalg.norm(before, axis=-1) / np.linalg.norm(after, axis=-1)
    assert (1 - cosine).max() < 0.01


def test_same_dates_no_change_and_nodata_in_either_date() -> None:
    before = _scene()
    ran_b = np.ones(before.shape[:2], bool)
    ran_a = ran_b.copy()
    ran_b[0, :3] = False  # nodata before
    ran_a[5, 5] = False  # nodata after
    after = before.copy()
    after[~ran_a] = np.nan
    score = change_score(np.where(ran_b[..., None], before, np.nan), after, ran_b, ran_a)
    assert np.isnan(score[0, :3]).all() and np.isnan(score[5, 5])
    assert np.isfinite(score[ran_b & ran_a]).all()
    np.testing.assert_allclose(score[ran_b & ran_a], 0.0, atol=1e-5)


def test_fewer_than_two_common_tiles_is_one_line() -> None:
    before = _scene(2, 2)
    ran_b = np.array([[True, True], [False, False]])
    ran_a = np.array([[True, False], [True, True]])
    with pytest.raises(PluginError, match="only 1 tile") as err:
        change_score(before, before, ran_b, ran_a)
    assert "\n" not in str(err.value)

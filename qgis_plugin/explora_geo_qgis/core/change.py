"""Per-tile change between two dates from their embeddings: the score of ``explora_geo:change``.

The score of a cell is the cosine distance between its two embeddings after centring each date on its own
mean over the cells valid in both dates:

    score = 1 - cos(before - mean_before, after - mean_after)        (0 = same direction, up to 2)

Raw embeddings of any two Sentinel-2 tiles point almost the same way (cosines of 0.999+), so an uncentred
distance is ~0 everywhere. Centring each date on its own mean also takes out what changed everywhere alike
(season, illumination, a sensor offset), so the score ranks the cells that changed relative to the scene.
"""

from __future__ import annotations

import numpy as np

from .errors import PluginError
from .products import centre_embeddings


def change_score(before: np.ndarray, after: np.ndarray, ran_before: np.ndarray, ran_after: np.ndarray,
                 ) -> np.ndarray:
    """Centred cosine distance per cell.

    Args:
        before, after: ``[R, K, D]`` embeddings of the two dates on one cell grid (NaN where not run).
        ran_before, ran_after: ``[R, K]`` bool, the cells whose tile ran in each date.

    Returns:
        ``[R, K]`` float32 in 0..2, higher = more change; NaN where either date did not run.

    Raises:
        PluginError: fewer than 2 cells valid in both dates (centring needs a scene).
    """
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} must be on one grid")
    both = ran_before & ran_after
    if both.sum() < 2:
        raise PluginError(f"only {int(both.sum())} tile(s) are valid in both dates; change needs at least 2 "
                          "(choose rasters that overlap more, or a lower minimum valid fraction).")
    b = centre_embeddings(before, both)
    a = centre_embeddings(after, both)
    norms = np.linalg.norm(b, axis=-1) * np.linalg.norm(a, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.einsum("rkd,rkd->rk", b, a) / np.where(norms > 0, norms, np.nan)
    return np.where(both, 1.0 - np.clip(cosine, -1.0, 1.0), np.nan).astype(np.float32)

"""Turn per-tile model outputs into the algorithms' products (pure numpy, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import PluginError
from .writers import CLASS_NODATA, FLOAT_NODATA, field_name

STATUS_OK, STATUS_PARTIAL, STATUS_NODATA = "ok", "partial", "nodata"


@dataclass
class Classification:
    """Per-cell classification, all arrays ``[R, K]`` except ``probabilities`` ``[R, K, n_classes]``.

    Attributes:
        class_id: predicted class, ``CLASS_NODATA`` (255) where the model did not run (uint8) or -1 (int16)
            beyond 255 classes.
        probability: probability of the predicted class, ``FLOAT_NODATA`` where the model did not run.
        probabilities: per-class probabilities (NaN where the model did not run).
        status: ``"ok"`` (all pixels valid), ``"partial"`` (some nodata, classified), ``"nodata"`` (skipped).
    """

    class_id: np.ndarray
    probability: np.ndarray
    probabilities: np.ndarray
    status: np.ndarray

    @property
    def nodata_id(self) -> int:
        return CLASS_NODATA if self.class_id.dtype == np.uint8 else -1


def classify(probabilities: np.ndarray, ran: np.ndarray, valid_fraction: np.ndarray) -> Classification:
    """Arg-max classes of ``probabilities`` ``[R, K, n]`` on cells where ``ran``."""
    n = probabilities.shape[-1]
    dtype = np.uint8 if n < CLASS_NODATA else np.int16
    nodata = CLASS_NODATA if dtype == np.uint8 else -1
    filled = np.where(ran[..., None], probabilities, -np.inf)
    class_id = np.where(ran, filled.argmax(axis=-1), nodata).astype(dtype)
    probability = np.where(ran, filled.max(axis=-1), FLOAT_NODATA).astype(np.float32)
    status = np.where(~ran, STATUS_NODATA, np.where(valid_fraction >= 1.0, STATUS_OK, STATUS_PARTIAL))
    return Classification(class_id, probability, probabilities.astype(np.float32), status)


def attribute_columns(result: Classification, class_names: Sequence[str], valid_fraction: np.ndarray,
                      row0: int = 0) -> dict[str, np.ndarray]:
    """GeoPackage columns: tile_row (``row0`` + the row in ``result``), tile_col, class_id (-1 = skipped),
    class_name, probability, one ``p_<class>`` per class, valid_frac and status."""
    rows, cols = np.indices(result.class_id.shape)
    rows += row0
    ran = result.status != STATUS_NODATA
    names = np.asarray(list(class_names) + [""], dtype=object)
    ids = np.where(ran, result.class_id.astype(np.int32), -1)
    columns: dict[str, np.ndarray] = {
        "tile_row": rows.astype(np.int32),
        "tile_col": cols.astype(np.int32),
        "class_id": ids,
        "class_name": names[np.where(ran, ids, len(class_names))],
        "probability": np.where(ran, result.probability, np.nan).astype(np.float32),
    }
    taken = set(columns)
    for k, name in enumerate(class_names):
        columns[field_name(name, taken)] = result.probabilities[..., k]
    columns["valid_frac"] = valid_fraction.astype(np.float32)
    columns["status"] = result.status.astype(object)
    return columns


#: similarity modes: ``centred`` (cosine after subtracting the scene's mean embedding) and ``cosine`` (raw)
SIMILARITY_MODES = ("centred", "cosine")


def cosine_similarity(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each cell's embedding ``[R, K, D]`` to ``reference`` ``[D]`` -> ``[R, K]``
    (NaN where the embedding is NaN, i.e. the tile was skipped, or zero)."""
    ref_norm = float(np.linalg.norm(reference))
    if not np.isfinite(ref_norm) or ref_norm == 0:
        raise PluginError("the reference embedding is empty or zero; choose a reference on valid pixels.")
    norms = np.linalg.norm(embeddings, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (embeddings @ (reference / ref_norm)) / np.where(norms > 0, norms, np.nan)


def reference_embedding(embeddings: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Mean of the L2-normalised embeddings ``[R, K, D]`` of the selected ``cells`` (``[R, K]`` bool) that
    were computed; raises when none was."""
    chosen = embeddings[cells]
    chosen = chosen[np.isfinite(chosen).all(axis=-1)]
    norms = np.linalg.norm(chosen, axis=-1, keepdims=True)
    chosen, norms = chosen[norms[:, 0] > 0], norms[norms[:, 0] > 0]
    if chosen.size == 0:
        raise PluginError("the reference point/polygon covers no processed tile (outside the extent or on "
                          "tiles below the minimum valid fraction); choose a reference inside the processed area.")
    return (chosen / norms).mean(axis=0)


def centre_embeddings(embeddings: np.ndarray, ran: np.ndarray) -> np.ndarray:
    """``embeddings`` ``[R, K, D]`` minus their mean over the cells that ran (``[R, K]`` bool).

    A raw embedding mostly encodes "this is a Sentinel-2 tile": uncentred cosine similarities of a whole scene
    sit in 0.999-1.0. Subtracting the scene's mean keeps what differs between tiles.
    """
    if not ran.any():
        return embeddings.copy()
    return embeddings - embeddings[ran].mean(axis=0, dtype=np.float64).astype(embeddings.dtype)


def similarity_map(embeddings: np.ndarray, ran: np.ndarray, cells: np.ndarray,
                   mode: str = "centred") -> np.ndarray:
    """Similarity of every cell to the reference cells: ``[R, K]`` float32, NaN where the tile did not run.

    Args:
        embeddings: ``[R, K, D]`` per-cell embeddings (NaN where the tile did not run).
        ran: ``[R, K]`` bool, the cells whose tile ran.
        cells: ``[R, K]`` bool, the cells under the reference geometries.
        mode: ``"centred"`` (cosine of scene-mean-centred embeddings) or ``"cosine"`` (raw cosine).

    Raises:
        PluginError: unknown mode, a reference on no processed tile, or (centred) a reference equal to the
            scene mean.
    """
    if mode not in SIMILARITY_MODES:
        raise PluginError(f"similarity mode {mode!r} is not one of {', '.join(SIMILARITY_MODES)}.")
    if mode == "centred" and ran.sum() < 2:
        raise PluginError(f"centred similarity needs at least 2 processed tiles ({int(ran.sum())} ran); choose a "
                          "larger area, or the raw cosine mode.")
    vectors = centre_embeddings(embeddings, ran) if mode == "centred" else embeddings
    reference = reference_embedding(vectors, cells & ran)
    if mode == "centred" and float(np.linalg.norm(reference)) < 1e-6 * max(
            float(np.nanmax(np.linalg.norm(vectors[ran], axis=-1))), 1e-30):
        raise PluginError("the reference tiles average to the scene's mean embedding, so centred similarity is "
                          "undefined; choose a more specific reference, or the raw cosine mode.")
    return np.where(ran, cosine_similarity(vectors, reference), np.nan).astype(np.float32)

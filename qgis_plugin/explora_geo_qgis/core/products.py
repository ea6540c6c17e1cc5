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
                      ) -> dict[str, np.ndarray]:
    """GeoPackage columns: tile_row, tile_col, class_id (-1 = skipped), class_name, probability, one
    ``p_<class>`` per class, valid_frac and status."""
    rows, cols = np.indices(result.class_id.shape)
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


def cosine_similarity(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each cell's embedding ``[R, K, D]`` to ``reference`` ``[D]`` -> ``[R, K]``
    (NaN where the embedding is NaN, i.e. the tile was skipped)."""
    ref_norm = float(np.linalg.norm(reference))
    if not np.isfinite(ref_norm) or ref_norm == 0:
        raise PluginError("the reference embedding is empty or zero; choose a reference on valid pixels.")
    norms = np.linalg.norm(embeddings, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (embeddings @ (reference / ref_norm)) / norms


def reference_embedding(embeddings: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Mean of the L2-normalised embeddings ``[R, K, D]`` of the selected ``cells`` (``[R, K]`` bool) that
    were computed; raises when none was."""
    chosen = embeddings[cells]
    chosen = chosen[np.isfinite(chosen).all(axis=-1)]
    if chosen.size == 0:
        raise PluginError("the reference point/polygon covers no processed tile (outside the extent or on "
                          "nodata); choose a reference inside the processed area.")
    unit = chosen / np.linalg.norm(chosen, axis=-1, keepdims=True)
    return unit.mean(axis=0)

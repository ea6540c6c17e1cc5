"""Per-band statistics (mean, std, percentiles) estimated from random patches, and their JSON file.

Statistics are computed over the VALID pixels of ``num_patches`` patches drawn like the pre-training
sampler (same rejection rule), in digital numbers minus the catalog's DN offset, which is exactly what
:class:`~explora_geo.normalization.Normalization` expects after subtracting its ``offset``. Mean and std are
exact over the sampled pixels (float64 sums); percentiles come from a seeded random subset of at most
``max_pixels`` values per band.

The JSON holds a ready ``normalization`` entry (``meanstd``), so it loads straight into a
:class:`Normalization` (:func:`normalization_from_stats`, also for ``satmae``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from explora_geo.atomic import write_text_atomic
from explora_geo.data.catalog import DataSpec, build_catalog
from explora_geo.data.sampling import PatchDataset, load_roi
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.sensors import Sensor

__all__ = ["PERCENTILES", "compute_stats", "save_stats", "load_stats", "normalization_from_stats"]

#: Percentiles reported per band.
PERCENTILES: tuple[float, ...] = (1.0, 2.0, 5.0, 25.0, 50.0, 75.0, 95.0, 98.0, 99.0)
FORMAT = "explora-geo-band-stats"


def compute_stats(
    data: DataSpec,
    *,
    bands: Sequence[str],
    sensor: str | Sensor | None = "sentinel2",
    band_names: Sequence[str] | None = None,
    nodata: float | None = None,
    patch_size: int = 64,
    num_patches: int = 256,
    seed: int = 0,
    roi: str | None = None,
    max_nodata_fraction: float = 0.5,
    dn_offset: float | str = "auto",
    res: float | None = None,
    max_pixels: int = 2_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Band statistics of ``data`` from ``num_patches`` random ``patch_size`` patches.

    Returns:
        the JSON-ready dict described in the module docstring (``bands``, ``mean``, ``std``, ``min``,
        ``max``, ``percentiles`` {"p1": [...], ...}, ``pixels``, ``patches``, ``rejected``, ``nodata``,
        ``dn_offset``, ``normalization``).
    """
    from tqdm.auto import tqdm

    catalog = build_catalog(data, bands=bands, sensor=sensor, band_names=band_names, nodata=nodata, res=res,
                            dn_offset=dn_offset)
    dataset = PatchDataset(catalog, patch_size=patch_size, length=num_patches, seed=seed,
                           max_nodata_fraction=max_nodata_fraction, roi=load_roi(roi) if roi else None,
                           fast=True)
    channels = len(catalog.bands)
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    low = np.full(channels, np.inf)
    high = np.full(channels, -np.inf)
    count, rejected = 0, 0
    keep = max(1, max_pixels // num_patches)
    subsets: list[np.ndarray] = []
    first = dataset.draw(0, 0)  # fails clearly (all nodata, ...) before the progress bar starts
    for i in tqdm(range(num_patches), desc="band statistics", unit="patch", disable=not progress):
        _, raw, valid, redraws = first if i == 0 else dataset.draw(0, i)
        rejected += redraws
        values = raw[:, valid].astype(np.float64) - catalog.offset  # [C, N valid]
        total += values.sum(axis=1)
        total_sq += np.square(values).sum(axis=1)
        low, high = np.minimum(low, values.min(axis=1)), np.maximum(high, values.max(axis=1))
        count += values.shape[1]
        pick = np.random.default_rng([seed, i]).choice(values.shape[1], min(keep, values.shape[1]), replace=False)
        subsets.append(values[:, pick])
    dataset.close()
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    pooled = np.concatenate(subsets, axis=1)
    pct = np.percentile(pooled, PERCENTILES, axis=1)  # [P, C]
    stats: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "bands": list(catalog.bands),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "min": low.tolist(),
        "max": high.tolist(),
        "percentiles": {f"p{p:g}": row.tolist() for p, row in zip(PERCENTILES, pct, strict=True)},
        "pixels": int(count),
        "patches": num_patches,
        "patch_size": patch_size,
        "rejected": rejected,
        "nodata": catalog.nodata,
        "dn_offset": catalog.offset,
        "files": len(catalog.files),
        "seed": seed,
    }
    stats["normalization"] = normalization_from_stats(stats, "meanstd").to_dict()
    return stats


def save_stats(stats: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``stats`` as JSON atomically (temporary file in the same folder, then ``os.replace``)."""
    return write_text_atomic(path, json.dumps(stats, indent=2) + "\n")


def load_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a statistics JSON written by :func:`save_stats`.

    Raises:
        ExploraGeoError: the file is missing, not JSON, or not a statistics file.
    """
    try:
        stats = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ExploraGeoError(f"statistics file {path} does not exist; run `explora-geo stats` first.") from err
    except json.JSONDecodeError as err:
        raise ExploraGeoError(
            f"statistics file {path} is not JSON ({err}); rewrite it with `explora-geo stats`."
        ) from err
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise ExploraGeoError(f"{path} is not an explora-geo statistics file; write one with `explora-geo stats`.")
    return stats


def normalization_from_stats(
    stats: dict[str, Any] | str | os.PathLike[str], scheme: str = "meanstd", bands: Sequence[str] | None = None
) -> Normalization:
    """A ``meanstd`` or ``satmae`` :class:`Normalization` from statistics (a dict or a JSON path).

    ``bands`` selects/reorders bands by name (default: all, in the file's order). The statistics' DN offset
    becomes the normalisation's ``offset``.
    """
    if not isinstance(stats, dict):
        stats = load_stats(stats)
    if scheme not in ("meanstd", "satmae"):
        raise ExploraGeoError(f"statistics give meanstd or satmae normalisation, not {scheme!r}.")
    names = tuple(stats["bands"])
    std = [max(float(s), 1e-6) for s in stats["std"]]  # a constant band must not divide by zero
    offset = float(stats.get("dn_offset") or 0.0)
    norm = Normalization(scheme, names, (offset,) * len(names) if offset else None,  # type: ignore[arg-type]
                         mean=tuple(stats["mean"]), std=tuple(std))
    return norm.select(bands) if bands is not None else norm

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

__all__ = ["PERCENTILES", "BandAccumulator", "compute_stats", "load_stats", "normalization_from_stats", "save_stats"]

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
    acc = BandAccumulator(len(catalog.bands), keep=max(1, max_pixels // num_patches))
    rejected = 0
    first = dataset.draw(0, 0)  # fails clearly (all nodata, ...) before the progress bar starts
    for i in tqdm(range(num_patches), desc="band statistics", unit="patch", disable=not progress):
        _, raw, valid, redraws = first if i == 0 else dataset.draw(0, i)
        rejected += redraws
        acc.add(raw, valid, catalog.offset, np.random.default_rng([seed, i]))
    dataset.close()
    return acc.to_stats(bands=catalog.bands, patches=num_patches, patch_size=patch_size, rejected=rejected,
                        nodata=catalog.nodata, dn_offset=catalog.offset, files=len(catalog.files), seed=seed)


class BandAccumulator:
    """Running per-band statistics over the valid pixels of patches, mergeable across processes.

    Holds float64 sums, sums of squares, minima, maxima and the pixel count per band, plus a random subset of
    at most ``keep`` valid pixels per added patch for the percentiles. :meth:`state` / :meth:`from_state`
    turn it into plain arrays (e.g. an ``.npz`` written by a worker) and :meth:`merge` adds another one.

    Args:
        channels: number of bands C.
        keep: pixels per patch kept for the percentiles.
    """

    def __init__(self, channels: int, keep: int) -> None:
        self.keep = int(keep)
        self.total = np.zeros(channels)
        self.total_sq = np.zeros(channels)
        self.low = np.full(channels, np.inf)
        self.high = np.full(channels, -np.inf)
        self.count = 0
        self.subsets: list[np.ndarray] = []  # each [C, <= keep]

    def add(self, raw: np.ndarray, valid: np.ndarray, offset: float, rng: np.random.Generator) -> None:
        """Add the valid pixels of one patch: ``raw`` ``[C, H, W]`` digital numbers, ``valid`` bool ``[H, W]``;
        ``offset`` (DN) is subtracted first; ``rng`` picks the kept subset."""
        values = raw[:, valid].astype(np.float64) - offset  # [C, N valid]
        if values.shape[1] == 0:
            return
        self.total += values.sum(axis=1)
        self.total_sq += np.square(values).sum(axis=1)
        self.low, self.high = np.minimum(self.low, values.min(axis=1)), np.maximum(self.high, values.max(axis=1))
        self.count += values.shape[1]
        pick = rng.choice(values.shape[1], min(self.keep, values.shape[1]), replace=False)
        self.subsets.append(values[:, pick])

    def merge(self, other: BandAccumulator) -> None:
        """Add ``other``'s pixels to this one."""
        self.total += other.total
        self.total_sq += other.total_sq
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)
        self.count += other.count
        self.subsets += other.subsets

    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays (``numpy.savez``-ready) holding everything; see :meth:`from_state`."""
        pooled = np.concatenate(self.subsets, axis=1) if self.subsets else np.zeros((len(self.total), 0))
        return {"total": self.total, "total_sq": self.total_sq, "low": self.low, "high": self.high,
                "count": np.asarray(self.count), "keep": np.asarray(self.keep), "subset": pooled}

    @classmethod
    def from_state(cls, state: Any) -> BandAccumulator:
        """The accumulator saved by :meth:`state` (a dict or an opened ``.npz``)."""
        acc = cls(len(state["total"]), int(state["keep"]))
        acc.total, acc.total_sq = np.array(state["total"]), np.array(state["total_sq"])
        acc.low, acc.high = np.array(state["low"]), np.array(state["high"])
        acc.count = int(state["count"])
        acc.subsets = [np.array(state["subset"])] if state["subset"].shape[1] else []
        return acc

    def to_stats(self, *, bands: Sequence[str], patches: int, patch_size: int, rejected: int,
                 nodata: float | None, dn_offset: float, files: int, seed: int) -> dict[str, Any]:
        """The statistics dict (the JSON schema of :func:`compute_stats`).

        Raises:
            ExploraGeoError: no valid pixel was added.
        """
        if self.count == 0:
            raise ExploraGeoError("no valid pixel to compute band statistics from; check the data and nodata.")
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 0.0))
        pct = np.percentile(np.concatenate(self.subsets, axis=1), PERCENTILES, axis=1)  # [P, C]
        stats: dict[str, Any] = {
            "format": FORMAT,
            "format_version": 1,
            "bands": list(bands),
            "mean": mean.tolist(),
            "std": std.tolist(),
            "min": self.low.tolist(),
            "max": self.high.tolist(),
            "percentiles": {f"p{p:g}": row.tolist() for p, row in zip(PERCENTILES, pct, strict=True)},
            "pixels": int(self.count),
            "patches": patches,
            "patch_size": patch_size,
            "rejected": rejected,
            "nodata": nodata,
            "dn_offset": dn_offset,
            "files": files,
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

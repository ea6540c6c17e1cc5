"""Input normalisation schemes, as data that travels with a model.

A :class:`Normalization` is stored in every backbone sidecar and in the exported ONNX bundle, so training,
torchgeo tasks and the QGIS plugin scale pixels the same way. Schemes, applied per band after subtracting
``offset`` (e.g. the +1000 DN of Sentinel-2 L2A baseline >= 04.00):

- ``reflectance``: ``x / divide`` (``divide`` = 10000 for Sentinel-2 and most torchgeo weights);
- ``meanstd``: ``(x - mean) / std``;
- ``satmae``: clip to ``[mean - 2 std, mean + 2 std]`` then scale to ``[0, 1]`` (SatMAE);
- ``none``: identity.

The math works on ``torch.Tensor`` and ``numpy.ndarray`` alike (shape ``[..., C, H, W]``, C = len(bands)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import get_sensor, select_bands

Scheme = Literal["reflectance", "meanstd", "satmae", "none"]
SCHEMES: tuple[str, ...] = ("reflectance", "meanstd", "satmae", "none")


@dataclass(frozen=True)
class Normalization:
    """Per-band input scaling.

    Args:
        scheme: one of ``reflectance``, ``meanstd``, ``satmae``, ``none``.
        bands: band names, in the order of the channels this applies to.
        offset: per-band value subtracted first (digital numbers). Zeros by default.
        divide: divisor of the ``reflectance`` scheme.
        mean, std: per-band statistics (digital numbers) for ``meanstd`` and ``satmae``.
    """

    scheme: Scheme
    bands: tuple[str, ...]
    offset: tuple[float, ...] | None = None
    divide: float = 10000.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ExploraGeoError(f"unknown normalisation {self.scheme!r}; choose one of {', '.join(SCHEMES)}.")
        n = len(self.bands)
        for name in ("offset", "mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
                if len(value) != n:
                    raise ExploraGeoError(
                        f"normalisation {name} has {len(value)} values for {n} bands ({', '.join(self.bands)})."
                    )
        object.__setattr__(self, "bands", tuple(self.bands))
        if self.scheme in ("meanstd", "satmae"):
            if self.mean is None or self.std is None:
                raise ExploraGeoError(f"normalisation {self.scheme} needs per-band mean and std.")
            if any(s <= 0 for s in self.std):
                raise ExploraGeoError("normalisation std values must be positive.")
        if self.scheme == "reflectance" and self.divide <= 0:
            raise ExploraGeoError(f"normalisation divide must be positive, got {self.divide}.")

    @classmethod
    def for_sensor(
        cls, sensor: str, bands: Sequence[str], scheme: Scheme = "satmae", offset: float = 0.0
    ) -> Normalization:
        """The preset normalisation of ``sensor`` for ``bands`` (names), with the sensor's statistics."""
        preset = get_sensor(sensor)
        names = tuple(preset.band(b).name for b in bands)
        offsets = (float(offset),) * len(names) if offset else None
        if scheme in ("meanstd", "satmae"):
            mean, std = preset.stats(names)
            return cls(scheme, names, offsets, mean=tuple(mean), std=tuple(std))
        if scheme == "reflectance":
            return cls(scheme, names, offsets, divide=preset.reflectance_scale or 255.0)
        return cls(scheme, names, offsets)

    def select(self, bands: Sequence[str]) -> Normalization:
        """The same scaling for a subset / reordering of the bands (chosen by name)."""
        idx = select_bands(self.bands, bands, source="the normalisation")

        def pick(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
            return None if values is None else tuple(values[i] for i in idx)

        return Normalization(self.scheme, tuple(self.bands[i] for i in idx), pick(self.offset), self.divide,
                             pick(self.mean), pick(self.std))

    def __call__(self, x: Any) -> Any:
        """Scale ``x`` of shape ``[..., C, H, W]`` (torch or numpy, floating point) per band."""
        if x.shape[-3] != len(self.bands):
            raise ExploraGeoError(
                f"normalisation expects {len(self.bands)} bands ({', '.join(self.bands)}), got {x.shape[-3]}."
            )

        def col(values: Sequence[float]) -> Any:
            # A [C, 1, 1] array/tensor of x's type, device and dtype.
            if hasattr(x, "new_tensor"):
                return x.new_tensor(list(values)).reshape(-1, 1, 1)
            import numpy as np

            return np.asarray(values, dtype=x.dtype).reshape(-1, 1, 1)

        if self.offset is not None:
            x = x - col(self.offset)
        if self.scheme == "reflectance":
            return x / self.divide
        if self.scheme == "none":
            return x
        assert self.mean is not None and self.std is not None
        mean, std = col(self.mean), col(self.std)
        if self.scheme == "meanstd":
            return (x - mean) / std
        low, high = mean - 2 * std, mean + 2 * std
        clipped = x.clip(low, high)
        return (clipped - low) / (high - low)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`."""
        known = {"scheme", "bands", "offset", "divide", "mean", "std"}
        unknown = set(data) - known
        if unknown:
            raise ExploraGeoError(f"normalisation has unknown keys {sorted(unknown)}; expected {sorted(known)}.")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kwargs)

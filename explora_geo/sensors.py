"""Sensors and their bands.

A :class:`Sensor` lists its bands by NAME, with centre wavelength (nm) and native ground sample distance
(GSD, metres). Everything in explora-geo selects bands by name through :func:`select_bands`; no code assumes a
fixed index order (EuroSAT files put B8A last, BigEarthNet and L2A products have no B10).

The registry is a plain dict built at import time; :func:`get_sensor` looks a preset up by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from explora_geo.errors import ExploraGeoError

__all__ = [
    "Band",
    "Sensor",
    "SENSORS",
    "get_sensor",
    "canonical_band_name",
    "select_bands",
]


@dataclass(frozen=True)
class Band:
    """One spectral band.

    Args:
        name: canonical name, e.g. ``"B02"`` or ``"B8A"`` for Sentinel-2, ``"R"`` for RGB.
        wavelength_nm: centre wavelength in nanometres.
        gsd_m: native ground sample distance in metres (``None`` when unknown, e.g. generic RGB).
        aliases: other names the band is known by (``"blue"``, ``"B2"``, ...), matched case-insensitively.
    """

    name: str
    wavelength_nm: float
    gsd_m: float | None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sensor:
    """A sensor preset.

    Args:
        name: registry key, e.g. ``"sentinel2"``.
        description: one line for listings.
        bands: all bands of the product, in the product's own order.
        groups: default channel groups of the group-channel ViT (band names). ``None`` means one group of
            all bands.
        rgb: names of the red, green and blue bands (in that order), used to initialise patch-embedding
            kernels from an RGB source model.
        mean, std: per-band statistics (same order as ``bands``) in the product's digital numbers, used by
            the ``meanstd`` and ``satmae`` normalisations; ``None`` when unknown.
        reflectance_scale: digital numbers per unit reflectance (10000 for Sentinel-2 and the torchgeo
            convention), ``None`` for products that are not reflectance.
    """

    name: str
    description: str
    bands: tuple[Band, ...]
    groups: tuple[tuple[str, ...], ...] | None = None
    rgb: tuple[str, str, str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    reflectance_scale: float | None = None
    _lookup: dict[str, str] = field(init=False, repr=False, compare=False, hash=False, default_factory=dict)

    def __post_init__(self) -> None:
        for band in self.bands:
            for alias in (band.name, *band.aliases):
                self._lookup[_fold(alias)] = band.name
        known = {b.name for b in self.bands}
        for group in self.groups or ():
            for name in group:
                if name not in known:
                    raise ValueError(f"sensor {self.name}: group band {name} is not one of its bands")
        for stats in (self.mean, self.std):
            if stats is not None and len(stats) != len(self.bands):
                raise ValueError(f"sensor {self.name}: statistics must have one value per band")

    @property
    def band_names(self) -> list[str]:
        """All band names, in product order."""
        return [b.name for b in self.bands]

    @property
    def model_groups(self) -> tuple[tuple[str, ...], ...]:
        """Channel groups the group-channel ViT uses by default for this sensor."""
        return self.groups if self.groups is not None else (tuple(self.band_names),)

    @property
    def model_bands(self) -> list[str]:
        """Bands a model for this sensor consumes, in model input order (groups flattened)."""
        return [name for group in self.model_groups for name in group]

    def band(self, name: str) -> Band:
        """The band called ``name`` (any alias, case-insensitive)."""
        canonical = self.canonical(name)
        if canonical is None:
            raise ExploraGeoError(
                f"unknown band {name!r} for sensor {self.name}; its bands are {', '.join(self.band_names)}."
            )
        return next(b for b in self.bands if b.name == canonical)

    def canonical(self, name: str) -> str | None:
        """Canonical name of ``name`` in this sensor, or ``None`` if it is not one of its bands."""
        return self._lookup.get(_fold(name)) or self._lookup.get(_fold(canonical_band_name(name)))

    def stats(self, bands: Sequence[str]) -> tuple[list[float], list[float]]:
        """Per-band (mean, std) for ``bands`` (names), in that order."""
        if self.mean is None or self.std is None:
            raise ExploraGeoError(
                f"sensor {self.name} has no built-in band statistics; compute them with "
                "`explora-geo stats --data PATH --out stats.json` and pass it (`pretrain --stats stats.json`), "
                "or use --normalization reflectance."
            )
        order = self.band_names
        idx = [order.index(self.band(b).name) for b in bands]
        return [self.mean[i] for i in idx], [self.std[i] for i in idx]


def _fold(name: str) -> str:
    return name.strip().lower()


_BAND_NUMBER = re.compile(r"^(?:b|band)[\s_-]?0*(\d{1,2})([a-z]?)$")


def canonical_band_name(name: str) -> str:
    """Normalise a band label: ``"b2"``, ``"B2"``, ``"band_2"`` and ``"B02"`` all become ``"B02"``;
    ``"b8a"`` becomes ``"B8A"``. Other labels are returned stripped, unchanged otherwise."""
    match = _BAND_NUMBER.match(_fold(name))
    if match is None:
        return name.strip()
    number, suffix = match.groups()
    return f"B{int(number)}{suffix.upper()}" if suffix else f"B{int(number):02d}"


def select_bands(
    available: Sequence[str],
    requested: Sequence[str],
    *,
    sensor: Sensor | str | None = None,
    source: str = "the input",
) -> list[int]:
    """Indices into ``available`` of the ``requested`` bands, matched by name.

    Names are compared through the sensor's aliases when a sensor is given, else through
    :func:`canonical_band_name` (so ``"B2"`` matches ``"B02"``). Extra available bands are simply not selected.

    Args:
        available: band names of the data, in the data's order (e.g. a file's band descriptions).
        requested: band names wanted, in the wanted order.
        sensor: sensor (or its name) whose aliases apply.
        source: what the data is, for the error message (a file name, a layer name).

    Returns:
        ``idx`` such that ``data[idx]`` has the requested bands in the requested order.

    Raises:
        ExploraGeoError: naming every requested band the data lacks.
    """
    if isinstance(sensor, str):
        sensor = get_sensor(sensor)

    def key(name: str) -> str:
        if sensor is not None:
            canonical = sensor.canonical(name)
            if canonical is not None:
                return canonical
        return canonical_band_name(name).upper()

    positions: dict[str, int] = {}
    for i, name in enumerate(available):
        positions.setdefault(key(name), i)
    missing = [name for name in requested if key(name) not in positions]
    if missing:
        raise ExploraGeoError(
            f"{source} lacks band(s) {', '.join(missing)} (it has {', '.join(available) or 'no named bands'}); "
            "use data that has them, or a model/--bands preset that does not need them."
        )
    return [positions[key(name)] for name in requested]


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------

def _s2_bands(with_b10: bool) -> tuple[Band, ...]:
    # Sentinel-2A centre wavelengths (ESA MSI spectral response), native GSD.
    table = [
        ("B01", 442.7, 60.0, ("coastal", "B1")),
        ("B02", 492.4, 10.0, ("blue", "B2")),
        ("B03", 559.8, 10.0, ("green", "B3")),
        ("B04", 664.6, 10.0, ("red", "B4")),
        ("B05", 704.1, 20.0, ("rededge1", "B5")),
        ("B06", 740.5, 20.0, ("rededge2", "B6")),
        ("B07", 782.8, 20.0, ("rededge3", "B7")),
        ("B08", 832.8, 10.0, ("nir", "B8")),
        ("B8A", 864.7, 20.0, ("nir08", "narrow_nir", "B08A")),
        ("B09", 945.1, 60.0, ("water_vapour", "nir09", "B9")),
        ("B10", 1373.5, 60.0, ("cirrus",)),
        ("B11", 1613.7, 20.0, ("swir16", "swir1")),
        ("B12", 2202.4, 20.0, ("swir22", "swir2")),
    ]
    return tuple(Band(n, w, g, a) for n, w, g, a in table if with_b10 or n != "B10")


# fMoW-Sentinel per-band statistics (SatMAE), order B01..B12 with B8A after B08 (L1C DN).
_S2_MEAN = (1370.19, 1184.38, 1120.77, 1136.26, 1263.74, 1645.40, 1846.87, 1762.60, 1972.62, 582.73, 14.77,
            1732.16, 1247.92)
_S2_STD = (633.15, 650.28, 712.13, 965.23, 948.98, 1108.07, 1258.36, 1233.15, 1364.39, 472.38, 14.31,
           1310.37, 1087.60)
# SatMAE grouping: visible + NIR (10 m), red edge (20 m), SWIR (20 m); B01, B09, B10 dropped.
_S2_GROUPS = (("B02", "B03", "B04", "B08"), ("B05", "B06", "B07", "B8A"), ("B11", "B12"))


def _landsat_oli(name: str, wavelengths: Sequence[float]) -> Sensor:
    labels = [("B1", ("coastal",)), ("B2", ("blue",)), ("B3", ("green",)), ("B4", ("red",)), ("B5", ("nir", "nir08")),
              ("B6", ("swir1", "swir16")), ("B7", ("swir2", "swir22")), ("B8", ("pan",)), ("B9", ("cirrus",))]
    bands = tuple(
        Band(n, w, 15.0 if n == "B8" else 30.0, (*a, f"B{int(n[1:]):02d}", f"SR_{n}"))
        for (n, a), w in zip(labels, wavelengths, strict=True)
    )
    return Sensor(
        name=name,
        description=f"{name.capitalize()} OLI, 9 reflective bands (B8 panchromatic at 15 m, others 30 m)",
        bands=bands,
        groups=(("B2", "B3", "B4", "B5"), ("B6", "B7")),
        rgb=("B4", "B3", "B2"),
        reflectance_scale=None,
    )


SENSORS: dict[str, Sensor] = {
    s.name: s
    for s in (
        Sensor(
            name="sentinel2",
            description="Sentinel-2 MSI Level-1C, 13 bands B01..B12 with B8A (TOA reflectance x 10000)",
            bands=_s2_bands(with_b10=True),
            groups=_S2_GROUPS,
            rgb=("B04", "B03", "B02"),
            mean=_S2_MEAN,
            std=_S2_STD,
            reflectance_scale=10000.0,
        ),
        Sensor(
            name="sentinel2_l2a",
            description="Sentinel-2 MSI Level-2A, 12 bands (no B10) (surface reflectance x 10000)",
            bands=_s2_bands(with_b10=False),
            groups=_S2_GROUPS,
            rgb=("B04", "B03", "B02"),
            mean=tuple(m for m, b in zip(_S2_MEAN, _s2_bands(True), strict=True) if b.name != "B10"),
            std=tuple(s for s, b in zip(_S2_STD, _s2_bands(True), strict=True) if b.name != "B10"),
            reflectance_scale=10000.0,
        ),
        _landsat_oli("landsat8", (443.0, 482.0, 561.4, 654.6, 864.7, 1608.9, 2200.7, 589.5, 1373.4)),
        _landsat_oli("landsat9", (442.7, 481.8, 561.3, 654.6, 864.6, 1607.5, 2198.1, 589.4, 1374.7)),
        Sensor(
            name="naip",
            description="NAIP aerial imagery, R, G, B, NIR at 0.6 m (8-bit)",
            bands=(
                Band("R", 635.0, 0.6, ("red",)),
                Band("G", 555.0, 0.6, ("green",)),
                Band("B", 465.0, 0.6, ("blue",)),
                Band("NIR", 860.0, 0.6, ("nir",)),
            ),
            groups=(("R", "G", "B", "NIR"),),
            rgb=("R", "G", "B"),
        ),
        Sensor(
            name="rgb",
            description="Generic RGB imagery (8-bit); GSD unknown",
            bands=(
                Band("R", 640.0, None, ("red",)),
                Band("G", 550.0, None, ("green",)),
                Band("B", 460.0, None, ("blue",)),
            ),
            groups=(("R", "G", "B"),),
            rgb=("R", "G", "B"),
        ),
    )
}


def get_sensor(name: str | Sensor) -> Sensor:
    """The sensor preset called ``name`` (case-insensitive; ``-`` and ``_`` are equivalent)."""
    if isinstance(name, Sensor):
        return name
    key = name.strip().lower().replace("-", "_")
    if key not in SENSORS:
        raise ExploraGeoError(
            f"unknown sensor/bands preset {name!r}; choose one of {', '.join(SENSORS)}."
        )
    return SENSORS[key]

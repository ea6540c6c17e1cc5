"""Reading the data-selection flags that ``prepare`` and ``stats`` share (``--bands``, ``--sensor``,
``--band-names``, ``--dn-offset``) into library arguments. Private: not a sub-command."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import SENSORS, Sensor, get_sensor


@dataclass(frozen=True)
class DataArgs:
    """``--bands`` as a sensor and band names, ``--band-names`` as a list, ``--dn-offset`` as a number or
    ``"auto"``."""

    sensor: Sensor
    bands: list[str]
    band_names: list[str] | None
    dn_offset: float | str


def data_args(args: argparse.Namespace) -> DataArgs:
    """``--bands`` is a sensor preset (all its bands) or comma-separated band names.

    Raises:
        ExploraGeoError: a ``--dn-offset`` that is neither ``auto`` nor a number.
    """
    key = args.bands.strip().lower().replace("-", "_")
    if key in SENSORS:
        sensor, bands = get_sensor(args.sensor or key), list(get_sensor(key).band_names)
    else:
        sensor = get_sensor(args.sensor or "sentinel2")
        bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    try:
        offset: float | str = args.dn_offset if args.dn_offset == "auto" else float(args.dn_offset)
    except ValueError as err:
        raise ExploraGeoError(f"--dn-offset {args.dn_offset!r} is not 'auto' or a number; "
                              "pass e.g. --dn-offset 1000 or --dn-offset auto.") from err
    band_names = [b.strip() for b in args.band_names.split(",")] if args.band_names else None
    return DataArgs(sensor, bands, band_names, offset)

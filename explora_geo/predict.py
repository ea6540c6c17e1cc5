"""Batch inference with an exported ONNX bundle over rasters, folders or STAC input: ``explora-geo predict``.

One engine: the tiling, value-scale check, nodata rules, tile fill, batching, stitching and the output files
are the QGIS plugin's inference core (``explora_geo_qgis.core``: :func:`~explora_geo_qgis.core.pipeline.infer`,
:mod:`~explora_geo_qgis.core.outputs`), imported, never copied. This module only supplies what QGIS supplies
in the plugin: a :class:`~explora_geo_qgis.core.reader.RasterReader` over an input (:class:`SourceReader`,
reading a catalog :class:`~explora_geo.data.catalog.Source` with rasterio on its grid at the model's GSD),
and a run folder that can be resumed.

Inputs are the units of a :class:`~explora_geo.data.catalog.Catalog` (bands located by name): a multi-band
raster, a scene of per-band files, or a STAC item. Each gives, in ``out``, Cloud-Optimized GeoTIFFs with the
pixels of the plugin's files:

- classifiers: ``<stem>_classes.tif`` (class ids, category names and colour table), ``<stem>_probability.tif``
  and ``<stem>_grid.gpkg``, as the plugin's ``classify``;
- embedders: ``<stem>_embedding.tif``, as the plugin's ``embed``;
- segmenters: ``<stem>_segmentation.tif`` (per-pixel classes at the model's GSD, windows blended by the core's
  ``SegmentationConsumer``; names and colours), as the plugin's ``segment``.

A large input is split into parts, bands of tile rows (``part_rows``); each part is run exactly as in a run of
the whole input (segmenters: with the neighbouring windows that reach into it) and written to
``out/parts/<stem>/``; the merge step stacks the parts into the input's files. ``out/predict-run.json`` records
the bundle (SHA-256) and the settings, ``out/parts/<stem>/p<j>.json`` each finished part, ``out/done/<stem>.json``
each finished input: a rerun skips those, and a folder holding a run of another bundle or settings is refused.
With ``devices``/``num_nodes`` above one, Lightning's predict loop spreads the parts over processes (DDP), each
writing its own parts, and rank 0 merges after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explora_geo.atomic import write_text_atomic
from explora_geo.data.catalog import Catalog, Source
from explora_geo.errors import ExploraGeoError

__all__ = ["RUN_FILE", "PredictSettings", "SourceReader", "catalog_at_gsd", "open_bundle", "predict"]

RUN_FILE = "predict-run.json"
DONE_DIR = "done"  # one record per finished input: <stem>.json
PARTS_DIR = "parts"  # parts of inputs split in bands of rows: parts/<stem>/p<j>_<file> and p<j>.json
PART_PIXELS = 4096 * 4096  # default part size, pixels of the input at the model's GSD
MIN_PART_ROWS = 16  # default parts have at least this many tile rows
_FORMAT = "explora-geo-predict-run"


def _core() -> Any:
    """The plugin's inference core package (one engine for QGIS and the CLI)."""
    try:
        import explora_geo_qgis.core.outputs  # noqa: F401 - imports the writers (and GDAL) up front
        from explora_geo_qgis.core import pipeline
    except ImportError as err:
        raise ExploraGeoError(
            f"the inference core explora_geo_qgis.core cannot be imported ({err}); reinstall explora-geo "
            "(pip install -e .) and the GDAL Python bindings (osgeo) matching your GDAL."
        ) from err
    return pipeline


@dataclass(frozen=True)
class PredictSettings:
    """How ``predict`` tiles and runs (the plugin's parameters, same meanings).

    Attributes:
        stride: distance between tile origins, pixels (``None``: the tile size, no overlap; for segmenters half
            of it, the plugin's default 50 % overlap).
        batch_size: tiles per forward pass.
        min_valid: tiles with a smaller valid-pixel fraction are skipped (nodata in every output).
        nodata: an extra nodata value, besides each file's own.
        scale, offset: input transform ``value * scale + offset`` before the model's normalisation.
        device: ``auto``, ``cpu`` or ``cuda`` (ONNX Runtime execution provider).
        part_rows: tile rows per part of an input (``None``: about 4096 x 4096 px, at least 16 rows); parts are
            the unit that processes share and a rerun resumes.
    """

    stride: int | None = None
    batch_size: int = 32
    min_valid: float = 0.5
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    device: str = "auto"
    part_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("stride", "batch_size", "min_valid", "nodata", "scale", "offset",
                                              "part_rows")}


class SourceReader:
    """The engine's ``RasterReader`` over one catalog unit, on the unit's grid (the model's GSD).

    Reads go through :func:`explora_geo.data.fast.read_window` (native windows when the file's grid is the
    unit grid, bilinear resampling of other resolutions, a warp into the UTM zone for geographic files). A
    pixel is valid when no model band is nodata by the core's :class:`NodataRule`: NaN/inf, the file's own
    nodata value (when it declares one), the user's extra value, and, for warped files, the warp's fill value.

    Args:
        source: the unit (channels in model band order).
        nodata: the user's extra nodata value.
        mask: ``[height, width]`` bool of the unit grid: pixels outside it are invalid (a region of interest).
    """

    def __init__(self, source: Source, *, nodata: float | None = None, mask: np.ndarray | None = None) -> None:
        import rasterio
        from explora_geo_qgis.core.reader import NodataRule

        from explora_geo.data.fast import HandlePool
        self.source = source
        self.pool = HandlePool()
        self.width, self.height, self.n_bands = source.width, source.height, len(source.channels)
        t = source.transform
        self.geotransform = (t.c, t.a, t.b, t.f, t.d, t.e)
        self.crs_wkt = source.crs.to_wkt()
        self.mask = mask
        self.rules = []
        for path, band in source.channels:
            with rasterio.open(path) as src:
                own = src.nodatavals[band - 1]
                warped = src.crs != source.crs
            rule = NodataRule().with_value(own).with_value(nodata)
            if warped:
                rule = rule.with_value(source.nodata if source.nodata is not None else 0.0)
            self.rules.append(rule)

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        from explora_geo.data.fast import read_window

        data = read_window(self.source, self.pool, r0, c0, r1 - r0, c1 - c0)
        valid = np.ones(data.shape[1:], dtype=bool) if self.mask is None else self.mask[r0:r1, c0:c1].copy()
        for band, rule in zip(data, self.rules, strict=True):
            rule.apply(band, valid)
        return data, valid

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read(r0, r1, c0, c1)

    def close(self) -> None:
        self.pool.close()


def open_bundle(bundle: str | os.PathLike[str], device: str = "auto") -> Any:
    """The bundle as the core's ``OnnxModel`` (``.info``: bands, GSD, tile size, classes).

    Raises:
        ExploraGeoError: a missing file, a file that is not an explora-geo ONNX bundle, an unavailable device.
    """
    _core()
    from explora_geo_qgis.core.errors import PluginError
    from explora_geo_qgis.core.model import OnnxModel

    try:
        return OnnxModel(bundle, device=device)
    except PluginError as err:
        raise ExploraGeoError(f"{bundle} is not a usable explora-geo ONNX bundle: {err}") from err


def catalog_at_gsd(build: Callable[[float | None], Catalog], gsd_m: float) -> Catalog:
    """``build(res)`` (a ``build_catalog`` / STAC catalog call) at ``gsd_m`` metres per pixel: built once to
    learn the target CRS, again with the GSD in that CRS's units when it differs."""
    from explora_geo.data.crs import metres_per_unit

    catalog = build(None)
    if all(abs(g - gsd_m) <= 1e-6 * gsd_m for g in catalog.gsd):
        return catalog
    return build(gsd_m / metres_per_unit(catalog.crs))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _outputs(stem: str, model_type: str) -> dict[str, str]:
    if model_type == "classifier":
        return {"classes": f"{stem}_classes.tif", "probability": f"{stem}_probability.tif",
                "grid": f"{stem}_grid.gpkg"}
    if model_type == "segmenter":
        return {"segmentation": f"{stem}_segmentation.tif"}
    return {"embedding": f"{stem}_embedding.tif"}


def _stems(sources: Sequence[Source]) -> list[str]:
    stems = [Path(s.name).stem if Path(s.name).suffix.lower() in (".tif", ".tiff", ".vrt", ".jp2", ".img")
             else s.name for s in sources]
    seen: dict[str, str] = {}
    for stem, source in zip(stems, sources, strict=True):
        if stem in seen:
            raise ExploraGeoError(f"two inputs would write the same outputs '{stem}_*' ({seen[stem]} and "
                                  f"{source.channels[0][0]}); rename one, or predict them into separate --out "
                                  "folders.")
        seen[stem] = source.channels[0][0]
    return stems


def _open_run(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The run file of ``out`` (created), after checking it is a run of the same bundle and settings."""
    path = out / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise ExploraGeoError(f"{path} is not a predict run file ({err}); choose another --out.") from err
        same = old.get("format") == _FORMAT and all(old.get(k) == record[k] for k in ("bundle_sha256", "settings"))
        if not same:
            raise ExploraGeoError(
                f"--out {out} holds another run (bundle {old.get('bundle')}, settings {old.get('settings')}); "
                "choose another --out folder, or delete it to start over."
            )
        return old
    if out.exists() and any(out.iterdir()):
        raise ExploraGeoError(f"--out {out} is not empty and holds no predict run; choose an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2))
    return record


def _roi_mask(roi: str | os.PathLike[str] | None, source: Source) -> np.ndarray | None:
    """``[height, width]`` bool: pixels of ``source``'s grid whose centre is inside the region of interest."""
    if roi is None:
        return None
    from rasterio.features import geometry_mask

    from explora_geo.data.sampling import load_roi

    shapes = load_roi(roi).to_crs(source.crs.to_wkt())
    return geometry_mask(list(shapes.geometry), out_shape=(source.height, source.width),
                         transform=source.transform, invert=True)


def predict(
    bundle: str | os.PathLike[str],
    catalog: Catalog,
    out: str | os.PathLike[str],
    settings: PredictSettings = PredictSettings(),
    *,
    roi: str | os.PathLike[str] | None = None,
    model: Any = None,
    progress: Callable[[str, float], None] | None = None,
    log: Callable[[str], None] = print,
    devices: int = 1,
    num_nodes: int = 1,
) -> dict[str, Any]:
    """Run ``bundle`` on every unit of ``catalog`` and write the plugin's products into ``out``.

    The unit of work is a part: a band of tile rows of one input (:meth:`TileGrid.row_bands`, ``part_rows``
    rows; an input of one part is written straight to its files). A part's tiles are read, filled, scaled, run
    and (segmenters: with the windows of the neighbouring rows that reach into it) blended exactly as in a run
    over the whole input; its files go to ``out/parts/<stem>/`` with a record, and the merge step stacks an
    input's parts into its Cloud-Optimized GeoTIFFs (and one grid), records the input and removes its parts.

    Args:
        bundle: the ``.onnx`` file written by ``explora-geo export``.
        catalog: the inputs, built with the bundle's bands at its GSD (see :func:`catalog_at_gsd`).
        out: the run folder (created; resumable: finished inputs and parts are skipped).
        settings: tiling, batching, nodata, input transform, device, part size.
        roi: a vector file (any CRS): only pixels inside count as valid.
        model: the bundle already opened by :func:`open_bundle` (else it is opened here).
        progress: ``progress(input_name, percent)`` during each input.
        log: receives one line per input or part (and the engine's notes).
        devices, num_nodes: processes per node and nodes: above 1 x 1, Lightning's predict loop runs the parts
            over ranks (DDP; see :func:`_run_distributed`), and rank 0 merges after every rank finished.

    Returns:
        a summary: ``{"out", "bundle", "model_type", "inputs": [{"name", "files", "tiles_run", "tiles",
        "parts", "skipped": bool, ...}], "finished", "skipped"}`` (on ranks other than 0: their parts only).

    Raises:
        ExploraGeoError: a bundle that is not an explora-geo ONNX bundle, a folder holding another run, and
            the engine's refusals (value scale, settings), one line each.
    """
    pipeline = _core()
    from explora_geo_qgis.core.blending import SegmentationConsumer
    from explora_geo_qgis.core.errors import PluginError
    from explora_geo_qgis.core.outputs import write_classification, write_embedding, write_segmentation
    from explora_geo_qgis.core.tiling import TileGrid

    bundle, out = Path(bundle), Path(out)
    distributed = devices * num_nodes > 1
    if model is None:  # distributed: every process opens its own session on its device (see _run_distributed)
        model = open_bundle(bundle, "cpu" if distributed else settings.device)
    info = model.info
    segmenter = info.model_type == "segmenter"
    if info.model_type not in ("classifier", "embedder", "segmenter") or (
            segmenter and "logits" not in model.output_names):
        raise ExploraGeoError(f"{bundle} is a {info.model_type} bundle without the outputs predict writes; "
                              "re-export it with 'explora-geo export'.")
    stride = settings.stride or (info.tile_size // 2 if segmenter else info.tile_size)
    if not 1 <= stride <= info.tile_size:
        raise ExploraGeoError(f"--stride {stride} must be between 1 and the model's tile size {info.tile_size} px.")
    if settings.batch_size < 1:
        raise ExploraGeoError(f"--batch-size {settings.batch_size} must be at least 1.")
    if settings.part_rows is not None and settings.part_rows < 1:
        raise ExploraGeoError(f"--part-rows {settings.part_rows} must be at least 1 (tile rows per part).")
    record = {"format": _FORMAT, "format_version": 1, "bundle": str(bundle.resolve()),
              "bundle_sha256": _sha256(bundle), "model_type": info.model_type,
              "settings": {**settings.to_dict(), "stride": stride, "roi": str(roi) if roi else None}}
    _open_run(out, record)
    outputs = ("probabilities",) if info.is_classifier else ("logits",) if segmenter else ("embedding",)
    run_settings = pipeline.RunSettings(overlap=1.0 - stride / info.tile_size, batch_size=settings.batch_size,
                                        min_valid=settings.min_valid, scale=settings.scale, offset=settings.offset)
    stems = _stems(catalog.sources)
    (out / DONE_DIR).mkdir(exist_ok=True)
    grids = [TileGrid.from_overlap(s.width, s.height, info.tile_size, run_settings.overlap) for s in catalog.sources]
    parts = [g.row_bands(settings.part_rows or _default_part_rows(g)) for g in grids]
    files = [_outputs(stem, info.model_type) for stem in stems]

    def finished(k: int) -> bool:
        return (out / DONE_DIR / f"{stems[k]}.json").exists() and all((out / f).exists() for f in files[k].values())

    def part_files(k: int, j: int) -> dict[str, Path]:
        return {key: out / PARTS_DIR / stems[k] / f"p{j:05d}_{name}" for key, name in files[k].items()}

    def part_record(k: int, j: int) -> Path:
        return out / PARTS_DIR / stems[k] / f"p{j:05d}.json"

    earlier = [finished(k) for k in range(len(stems))]
    items = [(k, j) for k in range(len(stems)) if not earlier[k] for j in range(len(parts[k]))
             if len(parts[k]) == 1 or not (part_record(k, j).exists()
                                           and all(p.exists() for p in part_files(k, j).values()))]
    todo = set(items)
    resumed = [f"{catalog.sources[k].name} part {j + 1}/{len(parts[k])}" for k in range(len(stems))
               if not earlier[k] and len(parts[k]) > 1 for j in range(len(parts[k])) if (k, j) not in todo]
    if resumed:
        log(f"{len(resumed)} part(s) finished in an earlier run, skipped: {', '.join(resumed[:5])}"
            + (", ..." if len(resumed) > 5 else ""))
    opened = {"model": model if not distributed else None}

    def run_item(i: int, prefix: str = "") -> dict[str, Any]:
        """Work item ``i``: part ``j`` of input ``k`` run and written (an input of one part: its own files,
        recorded as finished), then recorded."""
        k, j = items[i]
        source, grid, n_parts = catalog.sources[k], grids[k], len(parts[k])
        r0, r1 = parts[k][j]
        whole = n_parts == 1
        name = source.name if whole else f"{source.name} part {j + 1}/{n_parts}"
        if opened["model"] is None:
            opened["model"] = open_bundle(bundle, settings.device)
            if opened["model"].device_note:
                log(prefix + opened["model"].device_note)
        engine = opened["model"]
        reader = SourceReader(source, nodata=settings.nodata, mask=_roi_mask(roi, source))
        pixel_rows = (r0 * grid.stride, min(r1 * grid.stride, grid.height))
        consumer = None if not segmenter else SegmentationConsumer(
            len(info.class_names), rows=None if whole else pixel_rows)
        # a segmenter part also runs the windows of the rows around it that reach into its pixels (its halo)
        tile_rows = None if whole else grid.windows_over(*pixel_rows) if segmenter else (r0, r1)
        paths = {key: out / f for key, f in files[k].items()} if whole else part_files(k, j)

        def step(p: float, n: str = source.name) -> None:
            progress(n, 100.0 * (j + p / 100.0) / n_parts)

        try:
            results = pipeline.infer(reader, engine, run_settings, outputs=outputs, source=source.name,
                                     progress=step if progress else None, consumer=consumer, rows=tile_rows)
            if info.is_classifier:
                write_classification(results, info, grid_path=paths["grid"], class_path=paths["classes"],
                                     prob_path=paths["probability"], cog=whole)
            elif segmenter:
                write_segmentation(consumer.blender, info, reader.geotransform, reader.crs_wkt,
                                   class_path=paths["segmentation"], cog=whole)
            else:
                write_embedding(results, paths["embedding"], cog=whole)
        except PluginError as err:
            raise ExploraGeoError(f"{source.name}: {err}") from err
        finally:
            reader.close()
        for note in results.notes if j == 0 else []:
            log(f"{prefix}{source.name}: {note}")
        log(f"{prefix}{name}: {results.summary(engine.execution_provider)}")
        own = slice(r0 - results.row0, r1 - results.row0)  # the part's own tile rows (not its halo)
        entry = {"name": source.name, "files": files[k], "tiles_run": int(results.ran[own].sum()),
                 "tiles": int(results.ran[own].size), "tiles_partial": int(results.partial[own].sum()),
                 "seconds": round(results.seconds, 3), "device": engine.execution_provider, "parts": n_parts}
        write_text_atomic(out / DONE_DIR / f"{stems[k]}.json" if whole else part_record(k, j), json.dumps(entry))
        return {**entry, "part": j, "skipped": False}

    def merge(k: int) -> None:
        """The merge step of input ``k`` (of several parts, all recorded): its files from the parts' files, its
        record from theirs; then its parts are removed."""
        if earlier[k] or len(parts[k]) == 1:
            return
        from explora_geo_qgis.core.writers import merge_tile_grids, mosaic_rows

        records = []
        for j in range(len(parts[k])):
            if not part_record(k, j).exists():
                raise ExploraGeoError(f"{catalog.sources[k].name} part {j + 1} was not finished by any rank; rerun "
                                      "the same command to resume.")
            records.append(json.loads(part_record(k, j).read_text()))
        scale = grids[k].stride if segmenter else 1  # segmentation rows are pixels, the others cells
        for key, name in files[k].items():
            pieces = [part_files(k, j)[key] for j in range(len(parts[k]))]
            if key == "grid":
                merge_tile_grids(pieces, out / name)
            else:
                mosaic_rows([(p, r0 * scale) for p, (r0, _) in zip(pieces, parts[k], strict=True)], out / name)
        entry = {**records[0], **{n: sum(r[n] for r in records) for n in ("tiles_run", "tiles", "tiles_partial")},
                 "seconds": round(sum(r["seconds"] for r in records), 3)}
        write_text_atomic(out / DONE_DIR / f"{stems[k]}.json", json.dumps(entry))
        shutil.rmtree(out / PARTS_DIR / stems[k])
        log(f"{catalog.sources[k].name}: merged {len(parts[k])} parts into {', '.join(files[k].values())}")

    summary: dict[str, Any] = {"out": str(out), "bundle": str(bundle), "model_type": info.model_type, "rank": 0}
    if distributed:
        mine, rank = _run_distributed(run_item, len(items), devices, num_nodes, settings.device, opened)
        summary["rank"] = rank
        if rank != 0:
            summary.update(inputs=mine, finished=len(mine))
            return summary
    else:
        if model.device_note:
            log(model.device_note)
        for i in range(len(items)):
            run_item(i)
            k = items[i][0]
            if i + 1 == len(items) or items[i + 1][0] != k:
                merge(k)  # this input's last part: merge now (its disk space freed before the next input)
    entries = []
    for k, source in enumerate(catalog.sources):
        if earlier[k]:
            log(f"{source.name}: finished in an earlier run, skipped")
            entries.append({"name": source.name, "files": files[k], "skipped": True})
            continue
        if distributed:
            merge(k)  # the one merge step: rank 0, after every rank finished its parts
        done = out / DONE_DIR / f"{stems[k]}.json"
        if not done.exists():
            raise ExploraGeoError(f"{source.name} was not finished by any rank; rerun the same command to resume.")
        entries.append({**json.loads(done.read_text()), "skipped": False})
    summary["inputs"] = entries
    summary["finished"] = sum(not e["skipped"] for e in entries)
    summary["skipped"] = sum(e["skipped"] for e in entries)
    return summary


def _default_part_rows(grid: Any) -> int:
    """Tile rows per part: about :data:`PART_PIXELS` pixels of the input, at least :data:`MIN_PART_ROWS` rows
    (so that a segmenter part's halo, the window rows above and below it, stays a small share)."""
    return max(MIN_PART_ROWS, PART_PIXELS // (grid.width * grid.stride))


def _run_distributed(run_item: Callable[..., dict[str, Any]], n_items: int, devices: int, num_nodes: int,
                     device: str, opened: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Run the work items (parts of inputs) over ``devices`` x ``num_nodes`` processes with Lightning's predict
    loop (DDP: Lightning launches the processes, or joins those torchrun/SLURM started). Rank ``r`` of ``w``
    takes items ``r, r + w, ...``; each writes its own parts' files and records. Returns this rank's entries and
    its global rank, after a barrier (every rank done), so rank 0 can merge.

    ONNX Runtime does the compute; Lightning only places the processes (CPU accelerator, gloo). With a CUDA
    device, each process sees only its local GPU (``CUDA_VISIBLE_DEVICES``), set before its session is made.
    """
    import lightning as L
    import torch

    class _Parts(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.entries: list[dict[str, Any]] = []

        def setup(self, stage: str) -> None:
            if device != "cpu" and self.trainer.world_size > 1:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                gpus = visible.split(",") if visible else [str(i) for i in range(devices)]
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[self.trainer.local_rank % len(gpus)]
            opened["model"] = None  # opened by this process, on its device, at its first part

        def predict_dataloader(self) -> Any:
            mine = list(range(n_items))[self.trainer.global_rank::self.trainer.world_size]
            return torch.utils.data.DataLoader(mine, batch_size=None)

        def predict_step(self, batch: Any, batch_idx: int) -> None:
            self.entries.append(run_item(int(batch), prefix=f"[rank {self.trainer.global_rank}] "))

        def on_predict_end(self) -> None:
            self.trainer.strategy.barrier("explora-geo predict: every rank done")

    module = _Parts()
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.predict(module, return_predictions=False)
    return module.entries, trainer.global_rank

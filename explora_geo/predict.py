"""Batch inference with an exported ONNX bundle over rasters, folders or STAC input: ``explora-geo predict``.

One engine: the tiling, value-scale check, nodata rules, tile fill, batching, stitching and the output files
are the QGIS plugin's inference core (``explora_geo_qgis.core``: :func:`~explora_geo_qgis.core.pipeline.infer`,
:mod:`~explora_geo_qgis.core.outputs`), imported, never copied. This module only supplies what QGIS supplies
in the plugin: a :class:`~explora_geo_qgis.core.reader.RasterReader` over an input (:class:`SourceReader`,
reading a catalog :class:`~explora_geo.data.catalog.Source` with rasterio on its grid at the model's GSD),
and a run folder that can be resumed.

Inputs are the units of a :class:`~explora_geo.data.catalog.Catalog` (bands located by name): a multi-band
raster, a scene of per-band files, or a STAC item. Each gives, in ``out``:

- classifiers: ``<stem>_classes.tif`` (class ids, category names and colour table), ``<stem>_probability.tif``
  and ``<stem>_grid.gpkg``, the files the plugin's ``classify`` writes;
- embedders: ``<stem>_embedding.tif``, as the plugin's ``embed``;
- segmenters: ``<stem>_segmentation.tif`` (per-pixel classes at the model's GSD, windows blended by the core's
  ``SegmentationConsumer``; names and colours), as the plugin's ``segment``.

``out/predict-run.json`` records the bundle (SHA-256) and the settings, ``out/done/<stem>.json`` each finished
input: a rerun skips those, and a folder holding a run of another bundle or settings is refused. With
``devices``/``num_nodes`` above one, Lightning's predict loop spreads the inputs over processes (DDP), each
writing its own inputs' files and records, and rank 0 merges the records at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
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
    """

    stride: int | None = None
    batch_size: int = 32
    min_valid: float = 0.5
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("stride", "batch_size", "min_valid", "nodata", "scale", "offset")}


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

    Args:
        bundle: the ``.onnx`` file written by ``explora-geo export``.
        catalog: the inputs, built with the bundle's bands at its GSD (see :func:`catalog_for_bundle`).
        out: the run folder (created; resumable).
        settings: tiling, batching, nodata, input transform, device.
        roi: a vector file (any CRS): only pixels inside count as valid.
        model: the bundle already opened by :func:`open_bundle` (else it is opened here).
        progress: ``progress(input_name, percent)`` during each input.
        log: receives one line per input (and the engine's notes).
        devices, num_nodes: processes per node and nodes: above 1 x 1, Lightning's predict loop runs the inputs
            over ranks (DDP; see :func:`_run_distributed`), and rank 0 merges the ranks' records.

    Returns:
        a summary: ``{"out", "bundle", "model_type", "inputs": [{"name", "files", "tiles_run", "tiles",
        "skipped": bool, ...}], "finished", "skipped"}``.

    Raises:
        ExploraGeoError: a bundle that is not an explora-geo ONNX bundle, a folder holding another run, and
            the engine's refusals (value scale, settings), one line each.
    """
    pipeline = _core()
    from explora_geo_qgis.core.blending import SegmentationConsumer
    from explora_geo_qgis.core.errors import PluginError
    from explora_geo_qgis.core.outputs import write_classification, write_embedding
    from explora_geo_qgis.core.writers import write_geotiff

    bundle, out = Path(bundle), Path(out)
    if model is None:  # distributed: every process opens its own session on its device (see _run_distributed)
        model = open_bundle(bundle, "cpu" if devices * num_nodes > 1 else settings.device)
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
    record = {"format": _FORMAT, "format_version": 1, "bundle": str(bundle.resolve()),
              "bundle_sha256": _sha256(bundle), "model_type": info.model_type,
              "settings": {**settings.to_dict(), "stride": stride, "roi": str(roi) if roi else None}}
    _open_run(out, record)
    outputs = ("probabilities",) if info.is_classifier else ("logits",) if segmenter else ("embedding",)
    run_settings = pipeline.RunSettings(overlap=1.0 - stride / info.tile_size, batch_size=settings.batch_size,
                                        min_valid=settings.min_valid, scale=settings.scale, offset=settings.offset)
    stems = _stems(catalog.sources)
    (out / DONE_DIR).mkdir(exist_ok=True)
    opened = {"model": model}

    def run_one(k: int, prefix: str = "") -> dict[str, Any]:
        """Input ``k``: skipped when an earlier run finished it, else run and written, then recorded."""
        source, stem = catalog.sources[k], stems[k]
        files = _outputs(stem, info.model_type)
        record_path = out / DONE_DIR / f"{stem}.json"
        if record_path.exists() and all((out / f).exists() for f in files.values()):
            log(f"{prefix}{source.name}: finished in an earlier run, skipped")
            return {"name": source.name, "files": files, "skipped": True}
        if opened["model"] is None:
            opened["model"] = open_bundle(bundle, settings.device)
            if opened["model"].device_note:
                log(prefix + opened["model"].device_note)
        engine = opened["model"]
        reader = SourceReader(source, nodata=settings.nodata, mask=_roi_mask(roi, source))
        consumer = SegmentationConsumer(len(info.class_names)) if segmenter else None
        try:
            results = pipeline.infer(reader, engine, run_settings, outputs=outputs, source=source.name,
                                     progress=(lambda p, n=source.name: progress(n, p)) if progress else None,
                                     consumer=consumer)
            if info.is_classifier:
                write_classification(results, info, grid_path=out / files["grid"], class_path=out / files["classes"],
                                     prob_path=out / files["probability"])
            elif segmenter:  # as the plugin's segment algorithm writes its class raster
                blender = consumer.blender
                write_geotiff(out / files["segmentation"], blender.class_id[None], reader.geotransform,
                              reader.crs_wkt, nodata=blender.nodata_id, descriptions=["class"],
                              class_names=info.class_names, class_colors=info.class_colors)
            else:
                write_embedding(results, out / files["embedding"])
        except PluginError as err:
            raise ExploraGeoError(f"{source.name}: {err}") from err
        finally:
            reader.close()
        for note in results.notes:
            log(f"{prefix}{source.name}: {note}")
        log(f"{prefix}{source.name}: {results.summary(engine.execution_provider)}")
        entry = {"name": source.name, "files": files, "tiles_run": results.tiles_run,
                 "tiles": int(results.ran.size), "tiles_partial": results.tiles_partial,
                 "seconds": round(results.seconds, 3), "device": engine.execution_provider}
        write_text_atomic(record_path, json.dumps(entry))
        return {**entry, "skipped": False}

    summary: dict[str, Any] = {"out": str(out), "bundle": str(bundle), "model_type": info.model_type, "rank": 0}
    if devices * num_nodes > 1:
        started = time.time()
        entries, rank = _run_distributed(run_one, len(stems), devices, num_nodes, settings.device, opened)
        summary["rank"] = rank
        if rank != 0:
            summary.update(inputs=entries, finished=sum(not e["skipped"] for e in entries))
            return summary
        # the merge step (rank 0, after every rank finished): the inputs as recorded by all ranks
        mine = {e["name"]: e for e in entries}
        entries = []
        for source, stem in zip(catalog.sources, stems, strict=True):
            path = out / DONE_DIR / f"{stem}.json"
            if source.name in mine:
                entries.append(mine[source.name])
            elif path.exists():  # another rank's: finished now, or in an earlier run (then skipped)
                entries.append({**json.loads(path.read_text()), "skipped": path.stat().st_mtime < started})
            else:
                raise ExploraGeoError(f"{source.name} was not finished by any rank; rerun the same command to "
                                      "resume.")
    else:
        if model is not None and model.device_note:
            log(model.device_note)
        entries = [run_one(k) for k in range(len(stems))]
    summary["inputs"] = entries
    summary["finished"] = sum(not e["skipped"] for e in entries)
    summary["skipped"] = sum(e["skipped"] for e in entries)
    return summary


def _run_distributed(run_one: Callable[..., dict[str, Any]], n_inputs: int, devices: int, num_nodes: int,
                     device: str, opened: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Run the inputs over ``devices`` x ``num_nodes`` processes with Lightning's predict loop (DDP: Lightning
    launches the processes, or joins those torchrun/SLURM started). Rank ``r`` of ``w`` takes inputs ``r, r + w,
    ...``; each writes its own files and done records. Returns this rank's entries and its global rank, after a
    barrier (every rank done).

    ONNX Runtime does the compute; Lightning only places the processes (CPU accelerator, gloo). With a CUDA
    device, each process sees only its local GPU (``CUDA_VISIBLE_DEVICES``), set before its session is made.
    """
    import lightning as L
    import torch

    class _Inputs(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.entries: list[dict[str, Any]] = []

        def setup(self, stage: str) -> None:
            if device != "cpu" and self.trainer.world_size > 1:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                gpus = visible.split(",") if visible else [str(i) for i in range(devices)]
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[self.trainer.local_rank % len(gpus)]
            opened["model"] = None  # opened by this process, on its device, at its first input

        def predict_dataloader(self) -> Any:
            mine = list(range(n_inputs))[self.trainer.global_rank::self.trainer.world_size]
            return torch.utils.data.DataLoader(mine, batch_size=None)

        def predict_step(self, batch: Any, batch_idx: int) -> None:
            self.entries.append(run_one(int(batch), prefix=f"[rank {self.trainer.global_rank}] "))

        def on_predict_end(self) -> None:
            self.trainer.strategy.barrier("explora-geo predict: every rank done")

    module = _Inputs()
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.predict(module, return_predictions=False)
    return module.entries, trainer.global_rank

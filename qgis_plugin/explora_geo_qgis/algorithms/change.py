"""``explora_geo:change``: a per-tile change score between two dates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
)

from ..core.change import change_score
from ..core.errors import PluginError
from ..core.outputs import write_change
from ..core.pipeline import Cancelled
from ..core.writers import FLOAT_NODATA
from .base import TiledModelAlgorithm
from .loading import OutputLayer
from .styling import ramp_style


class ChangeAlgorithm(TiledModelAlgorithm):
    """Embed the tiles of two dates on one grid and score how much each tile changed."""

    BEFORE = "BEFORE"
    AFTER = "AFTER"
    OUTPUT = "OUTPUT"
    OUTPUT_GRID = "OUTPUT_GRID"

    NAME = "change"
    DISPLAY_NAME = "Change between two dates (ExPLoRA)"
    HELP = ("Embeds every tile of the BEFORE and the AFTER raster with an ONNX model exported by 'explora-geo "
            "export', on one grid over their overlap (their CRSs may differ; the grid is in BEFORE's CRS, or "
            "its UTM zone when geographic), and writes a change score per tile: the cosine distance between "
            "the two embeddings after centring each date on its own mean (0 = no change, up to 2; higher = "
            "more change than the scene as a whole). Band mapping, nodata, mask and the other settings apply "
            f"to both dates. A tile with too few valid pixels in either date is nodata ({FLOAT_NODATA:g}). "
            "Optional: a tile grid GeoPackage with the score and both valid fractions.")

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.BEFORE, "Before (earlier date)"))
        self.addParameter(QgsProcessingParameterRasterLayer(self.AFTER, "After (later date)"))
        self.add_common_parameters(with_input=False)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Change score raster"))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_GRID, "Change tile grid (GeoPackage)", optional=True, createByDefault=False))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        grid_path = self.parameterAsOutputLayer(parameters, self.OUTPUT_GRID, context) or None
        if grid_path and not grid_path.lower().endswith(".gpkg"):
            grid_path = str(Path(grid_path).with_suffix(".gpkg"))
        try:
            before = self.raster_layer(parameters, self.BEFORE, context)
            after = self.raster_layer(parameters, self.AFTER, context)
            model = self.load_model(parameters, context, feedback)
            grid, mask_wkts = self.working_grid(before, model, parameters, context, feedback, other=after)
            runs = []
            for label, layer, progress in (("BEFORE", before, (0.0, 50.0)), ("AFTER", after, (50.0, 100.0))):
                feedback.pushInfo(f"{label}: '{layer.name()}'")
                runs.append(self.infer_layer(layer, model, grid, mask_wkts, parameters, context, feedback,
                                             ("embedding",), progress))
        except PluginError as err:
            raise QgsProcessingException(str(err)) from err
        except Cancelled as err:
            raise QgsProcessingException("cancelled by the user; no output was written.") from err
        rb, ra = runs
        both = rb.ran & ra.ran
        try:
            score = change_score(rb.outputs["embedding"], ra.outputs["embedding"], rb.ran, ra.ran)
            done = score[both]
            top = np.argsort(np.where(both, score, -np.inf), axis=None)[::-1][:3]
            feedback.pushInfo(f"Change score over {int(both.sum())} tile(s) valid in both dates: "
                              f"{done.min():.3f} .. {done.max():.3f} (median {np.median(done):.3f}); highest at "
                              "(row, col) " + ", ".join(f"({r}, {c})" for r, c in zip(*np.unravel_index(
                                  top, score.shape))) + ".")
        except PluginError as err:  # fewer than 2 tiles valid in both dates: valid, all-nodata outputs
            score = np.full(both.shape, np.nan, np.float32)
            feedback.pushInfo(f"No change score: {err} The outputs are all nodata.")
        self.check_cancel(feedback)
        write_change(rb, ra, score, out, grid_path)
        outputs = [OutputLayer(out, "change", ramp_style("Reds"))] + ([OutputLayer(grid_path, "change grid")] if grid_path else [])
        self.present_outputs(parameters, context, outputs, source=f"{before.name()} → {after.name()}")
        tiles, seconds = rb.tiles_run + ra.tiles_run, rb.seconds + ra.seconds
        return {self.OUTPUT: out, self.OUTPUT_GRID: grid_path, "TILES_RUN": tiles,
                "TILES_CHANGE_SCORED": int(np.isfinite(score).sum()), "SECONDS": seconds,
                "FORWARD_SECONDS": rb.forward_seconds + ra.forward_seconds,
                "TILES_PER_SECOND": tiles / seconds if seconds > 0 else 0.0,
                "EXECUTION_PROVIDER": model.execution_provider}

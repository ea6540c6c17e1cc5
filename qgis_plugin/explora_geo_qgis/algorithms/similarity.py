"""``explora_geo:similarity``: similarity of every tile's embedding to a reference point or polygon."""

from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterRasterDestination,
)

from ..core.errors import PluginError
from ..core.outputs import write_float_map
from ..core.products import SIMILARITY_MODES, similarity_map
from ..core.writers import FLOAT_NODATA
from .base import TiledModelAlgorithm, geometries_as_wkt
from .compat import SOURCE_POINT, SOURCE_POLYGON
from .loading import OutputLayer
from .raster_source import memory_layer, rasterize

MODE_LABELS = ("Centred on the scene mean (recommended)", "Raw cosine")


class SimilarityAlgorithm(TiledModelAlgorithm):
    """Similarity map: cosine similarity between each tile and the reference tiles' mean embedding, after
    centring every embedding on the scene's mean (default) or raw."""

    REFERENCE = "REFERENCE"
    MODE = "MODE"
    OUTPUT = "OUTPUT"

    NAME = "similarity"
    DISPLAY_NAME = "Similarity to a reference (ExPLoRA)"
    HELP = ("Embeds every tile with an ONNX model exported by 'explora-geo export' and writes the similarity "
            "(-1..1) of every tile to the tiles under the reference points/polygons. Centred (default): "
            "embeddings minus the scene's mean embedding, so the map spreads over the range; raw cosine: "
            "uncentred (a whole scene then scores close to 1). Skipped tiles are nodata "
            f"({FLOAT_NODATA:g}).")

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.REFERENCE, "Reference point(s) or polygon(s)",
            [SOURCE_POINT, SOURCE_POLYGON]))
        self.addParameter(QgsProcessingParameterEnum(self.MODE, "Similarity", list(MODE_LABELS), defaultValue=0))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Similarity raster"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        reference = self.parameterAsSource(parameters, self.REFERENCE, context)
        if reference is None:
            raise QgsProcessingException("the reference layer is missing; choose a point or polygon layer.")
        mode = SIMILARITY_MODES[self.parameterAsEnum(parameters, self.MODE, context)]
        run = self.run_model(parameters, context, feedback, ("embedding",))
        results = run.results
        wkts = geometries_as_wkt(reference, run.grid.crs, context)
        cells = rasterize(memory_layer(wkts, run.grid.crs), run.cell_geotransform, run.tiles.n_cols,
                          run.tiles.n_rows, all_touched=True)
        if results.tiles_run:
            try:
                similarity = similarity_map(results.outputs["embedding"], results.ran, cells, mode)
            except PluginError as err:
                raise QgsProcessingException(str(err)) from err
            done = similarity[results.ran]
            feedback.pushInfo(f"Reference: {int((cells & results.ran).sum())} processed tile(s) under {len(wkts)} "
                              f"geometr(y/ies); {mode} similarity spans {done.min():.3f} .. {done.max():.3f}.")
        else:  # the reason was logged by the run; the output is valid and all nodata
            similarity = np.full(results.ran.shape, np.nan, np.float32)
        self.check_cancel(feedback)
        write_float_map(results, similarity, out, f"{mode}_similarity")
        self.present_outputs(parameters, context, [OutputLayer(out, "similarity")])
        return {self.OUTPUT: out, "REFERENCE_TILES": int((cells & results.ran).sum()), **run.stats()}

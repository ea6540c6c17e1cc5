"""``explora_geo:similarity``: cosine similarity of every tile's embedding to a reference point or polygon."""

from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterRasterDestination,
)

from ..core.errors import PluginError
from ..core.products import cosine_similarity, reference_embedding
from ..core.writers import FLOAT_NODATA, write_geotiff
from .compat import SOURCE_POINT, SOURCE_POLYGON
from .base import TiledModelAlgorithm, geometries_as_wkt
from .loading import OutputLayer
from .raster_source import memory_layer, rasterize


class SimilarityAlgorithm(TiledModelAlgorithm):
    """Similarity map: cosine similarity between each tile and the reference tiles' mean embedding."""

    REFERENCE = "REFERENCE"
    OUTPUT = "OUTPUT"

    def name(self) -> str:
        return "similarity"

    def displayName(self) -> str:
        return "Similarity to a reference (ExPLoRA)"

    def shortHelpString(self) -> str:
        return ("Embeds every tile with an ONNX model exported by 'explora-geo export', averages the unit "
                "embeddings of the tiles under the reference points/polygons, and writes the cosine similarity "
                f"(-1..1) of every tile to that reference. Skipped tiles are nodata ({FLOAT_NODATA:g}).")

    def createInstance(self) -> SimilarityAlgorithm:
        return SimilarityAlgorithm()

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.REFERENCE, "Reference point(s) or polygon(s)",
            [SOURCE_POINT, SOURCE_POLYGON]))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Similarity raster"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        reference = self.parameterAsSource(parameters, self.REFERENCE, context)
        if reference is None:
            raise QgsProcessingException("the reference layer is missing; choose a point or polygon layer.")
        run = self.run_model(parameters, context, feedback, ("embedding",))
        embeddings = run.results.outputs["embedding"]
        wkts = geometries_as_wkt(reference, run.grid.crs, context)
        cells = rasterize(memory_layer(wkts, run.grid.crs), run.cell_geotransform, run.tiles.n_cols,
                          run.tiles.n_rows, all_touched=True)
        try:
            ref = reference_embedding(embeddings, cells)
        except PluginError as err:
            raise QgsProcessingException(str(err)) from err
        similarity = cosine_similarity(embeddings, ref)
        similarity = np.where(run.results.ran, similarity, FLOAT_NODATA).astype(np.float32)
        feedback.pushInfo(f"Reference: {int(cells.sum())} tile(s) under {len(wkts)} geometr(y/ies).")
        self.check_cancel(feedback)
        write_geotiff(out, similarity[None], run.cell_geotransform, run.crs_wkt, nodata=FLOAT_NODATA,
                      descriptions=["cosine_similarity"])
        self.present_outputs(parameters, context, [OutputLayer(out, "similarity")])
        return {self.OUTPUT: out, "REFERENCE_TILES": int(cells.sum()), **run.stats()}

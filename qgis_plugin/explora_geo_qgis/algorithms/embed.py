"""``explora_geo:embed``: a D-band GeoTIFF of per-tile embeddings."""

from __future__ import annotations

from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProcessingParameterRasterDestination

from ..core.outputs import write_embedding
from ..core.writers import FLOAT_NODATA
from .base import TiledModelAlgorithm
from .loading import OutputLayer


class EmbedAlgorithm(TiledModelAlgorithm):
    """Write the model's embedding of every tile as the bands of one output cell."""

    OUTPUT = "OUTPUT"

    NAME = "embed"
    DISPLAY_NAME = "Tile embeddings (ExPLoRA)"
    HELP = ("Runs an ONNX model exported by 'explora-geo export' over the raster and writes a GeoTIFF with "
            "one pixel per tile and one band per embedding dimension (D bands, float32). Tiles with too few "
            f"valid pixels are nodata ({FLOAT_NODATA:g}).")

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Embeddings (D-band GeoTIFF)"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        run = self.run_model(parameters, context, feedback, ("embedding",))
        self.check_cancel(feedback)
        write_embedding(run.results, out)
        self.present_outputs(parameters, context, [OutputLayer(out, "embeddings")])
        return {self.OUTPUT: out, **run.stats()}

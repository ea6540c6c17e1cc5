"""``explora_geo:cluster``: an unsupervised class map, k-means on the tiles' embeddings."""

from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
)

from ..core.errors import PluginError
from ..core.kmeans import kmeans
from ..core.model import default_colors
from ..core.outputs import write_class_map
from .base import TiledModelAlgorithm
from .compat import NUMBER_INTEGER
from .loading import OutputLayer
from .styling import class_style

MAX_CLUSTERS = 64


class ClusterAlgorithm(TiledModelAlgorithm):
    """Embed every tile, cluster the embeddings with k-means, write the clusters as a styled class raster."""

    CLUSTERS = "CLUSTERS"
    SEED = "SEED"
    OUTPUT = "OUTPUT"

    NAME = "cluster"
    DISPLAY_NAME = "Cluster tiles, unsupervised (ExPLoRA)"
    HELP = ("Embeds every tile with an ONNX model exported by 'explora-geo export' and groups the embeddings "
            "into k clusters with k-means (k-means++ starts, seeded: the same seed gives the same map). Writes "
            "a class raster, one cluster per tile, cluster 1 the largest, in distinct colours: an unsupervised "
            "map to inspect, name or use as training examples. Tiles with too few valid pixels are nodata.")

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.add_common_parameters()
        self.addParameter(QgsProcessingParameterNumber(
            self.CLUSTERS, "Number of clusters (k)", NUMBER_INTEGER, defaultValue=8, minValue=2,
            maxValue=MAX_CLUSTERS))
        self.addParameter(QgsProcessingParameterNumber(
            self.SEED, "Random seed (k-means++ starts)", NUMBER_INTEGER, defaultValue=0, minValue=0))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Cluster raster"))

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        k = self.parameterAsInt(parameters, self.CLUSTERS, context)
        seed = self.parameterAsInt(parameters, self.SEED, context)
        run = self.run_model(parameters, context, feedback, ("embedding",))
        results = run.results
        names = [f"cluster {i + 1}" for i in range(k)]
        colors = list(default_colors(k))
        labels = np.full(results.ran.shape, -1, np.int32)
        if results.tiles_run:
            try:
                fit = kmeans(results.outputs["embedding"][results.ran], k, seed=seed)
            except PluginError as err:
                raise QgsProcessingException(str(err)) from err
            labels[results.ran] = fit.labels
            feedback.pushInfo(f"k-means, k={k}, seed {seed}: {fit.iterations} iteration(s), inertia "
                              f"{fit.inertia:.4g}; tiles per cluster: "
                              + ", ".join(f"{n}={c}" for n, c in zip(names, fit.sizes)))
        # else: the run logged why no tile was processed; the output is valid and all nodata
        self.check_cancel(feedback)
        write_class_map(results, labels, out, names, colors, description="cluster")
        self.present_outputs(parameters, context, [OutputLayer(out, "clusters", class_style(names, colors))])
        return {self.OUTPUT: out, **run.stats()}

"""Enum values spelled so the plugin runs on QGIS 3.22 (Debian bookworm) up to 3.40 and QGIS 4.

Newer QGIS moved many enums to ``Qgis.*`` (3.30/3.36) and QGIS 4 drops the old unscoped names. Each constant
takes the new spelling when it exists and the scoped old spelling (which 3.22 accepts) otherwise.
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    Qgis,
    QgsColorRampShader,
    QgsProcessing,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsRasterBandStats,
    QgsRasterDataProvider,
    QgsUnitTypes,
)


def pick(*candidates: tuple[Any, str]) -> Any:
    """The first attribute path (``(root, "A.B")``) that exists."""
    for root, dotted in candidates:
        value = root
        try:
            for part in dotted.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise AttributeError(f"none of {[d for _, d in candidates]} exists in this QGIS")


SOURCE_POINT = pick((Qgis, "ProcessingSourceType.VectorPoint"), (QgsProcessing, "SourceType.TypeVectorPoint"))
SOURCE_POLYGON = pick((Qgis, "ProcessingSourceType.VectorPolygon"),
                      (QgsProcessing, "SourceType.TypeVectorPolygon"))
FILE_BEHAVIOR = pick((Qgis, "ProcessingFileParameterBehavior.File"), (QgsProcessingParameterFile, "Behavior.File"))
NUMBER_DOUBLE = pick((Qgis, "ProcessingNumberParameterType.Double"), (QgsProcessingParameterNumber, "Type.Double"))
NUMBER_INTEGER = pick((Qgis, "ProcessingNumberParameterType.Integer"),
                      (QgsProcessingParameterNumber, "Type.Integer"))
METERS = pick((Qgis, "DistanceUnit.Meters"), (QgsUnitTypes, "DistanceUnit.DistanceMeters"))
RESAMPLE_BILINEAR = pick((Qgis, "RasterResamplingMethod.Bilinear"),
                         (QgsRasterDataProvider, "ResamplingMethod.Bilinear"))
RESAMPLE_AVERAGE = pick((Qgis, "RasterResamplingMethod.Average"),
                        (QgsRasterDataProvider, "ResamplingMethod.Average"))
STATS_MIN_MAX = (pick((Qgis, "RasterBandStatistic.Min"), (QgsRasterBandStats, "Stats.Min"))
                 | pick((Qgis, "RasterBandStatistic.Max"), (QgsRasterBandStats, "Stats.Max")))
RAMP_INTERPOLATED = pick((Qgis, "ShaderInterpolationMethod.Linear"), (QgsColorRampShader, "Type.Interpolated"))

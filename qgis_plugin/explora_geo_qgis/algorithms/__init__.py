"""The explora-geo Processing algorithms (QGIS side; the work happens in ``..core``)."""

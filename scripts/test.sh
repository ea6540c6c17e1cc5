#!/usr/bin/env bash
# Run every test of explora-geo: the library's suite in .venv, then the QGIS plugin's suite in .venv-qgis
# (headless QGIS 3.22). Sets both environments up on first use. Extra arguments go to both pytest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit $?

status=0
echo "== library tests (.venv, Python 3.12)"
.venv/bin/python -m pytest tests/lib "$@" || status=$?
echo "== QGIS plugin tests (.venv-qgis, Debian python3 + QGIS)"
QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python -m pytest tests/plugin "$@" || status=$?
exit $status

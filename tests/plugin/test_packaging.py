"""The installable plugin zip, and the security scan plugins.qgis.org runs (Bandit)."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
            "tracker", "homepage", "license", "hasProcessingProvider"]


def test_build_plugin_zip_installs_and_registers(tmp_path: Path) -> None:
    out = subprocess.run([str(REPO / "scripts" / "build_plugin.sh"), str(tmp_path)], check=True,  # noqa: S603
                         capture_output=True, text=True).stdout.strip()
    zip_path = Path(out)
    assert zip_path.name == "explora_geo_qgis-0.1.0.zip" and zip_path.is_file()
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names} == {"explora_geo_qgis"}
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        assert {"explora_geo_qgis/metadata.txt", "explora_geo_qgis/__init__.py", "explora_geo_qgis/icon.png",
                "explora_geo_qgis/LICENSE", "explora_geo_qgis/core/pipeline.py"} <= set(names)
        meta = configparser.ConfigParser()
        meta.read_string(zf.read("explora_geo_qgis/metadata.txt").decode())
        zf.extractall(tmp_path / "plugins")
    general = meta["general"]
    assert all(general.get(key, "").strip() for key in REQUIRED), [k for k in REQUIRED if not general.get(k)]
    assert general["hasProcessingProvider"] == "yes" and general["qgisMinimumVersion"] == "3.22"
    # load the extracted plugin as QGIS would (classFactory -> initProcessing) in a fresh interpreter
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.append('/usr/share/qgis/python/plugins')\n"
        "sys.modules['onnxruntime'] = None  # the plugin must load (and explain at run time) without it\n"
        "from qgis.core import QgsApplication\n"
        "app = QgsApplication([], False); app.setPrefixPath('/usr', True); app.initQgis()\n"
        "import explora_geo_qgis; assert explora_geo_qgis.__file__.startswith(sys.argv[1])\n"
        "plugin = explora_geo_qgis.classFactory(None); plugin.initGui()\n"
        "p = QgsApplication.processingRegistry().providerById('explora_geo')\n"
        "print(','.join(sorted(a.id() for a in p.algorithms())))\n"
        "plugin.unload(); assert QgsApplication.processingRegistry().providerById('explora_geo') is None\n"
        "app.exitQgis()\n"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    command = [sys.executable, "-c", code, str(tmp_path / "plugins")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)  # noqa: S603
    assert done.returncode == 0, done.stderr[-2000:]
    registered = done.stdout.strip().splitlines()[-1].split(",")
    assert registered == ["explora_geo:change", "explora_geo:classify", "explora_geo:classify_from_examples",
                          "explora_geo:cluster", "explora_geo:embed", "explora_geo:segment",
                          "explora_geo:similarity"], registered


def test_bandit_finds_nothing_of_medium_severity_or_above() -> None:
    bandit = Path(sys.executable).with_name("bandit")
    command = [str(bandit), "-r", str(REPO / "qgis_plugin"), "--severity-level", "medium", "-f", "json", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # noqa: S603
    report = json.loads(done.stdout)
    assert report["results"] == [], report["results"]
    assert report["metrics"]["_totals"]["loc"] > 500  # it did scan the plugin
    assert done.returncode == 0

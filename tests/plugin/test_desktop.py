"""The plugin in the real QGIS 3.22 desktop, as a new user meets it.

QGIS runs under Xvfb with a fresh profile (``--profiles-path`` in the test's tmp dir) into which the zip that
``scripts/build_plugin.sh`` builds is unzipped and enabled. ``desktop_session.py`` (run by ``qgis --code``)
adds the T33UUU scene, opens the classify dialog, clicks *Run*, waits for the outputs to load, and reports
what it saw; screenshots of the dialog and the map are saved beside the report, in pytest's tmp dir (the test
prints the folder). A missing QGIS desktop or Xvfb is a broken set-up: the test fails and says how to fix it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SESSION = Path(__file__).with_name("desktop_session.py")
TIMEOUT_S = 150  # whole QGIS session, start to quit; the session's own watchdog fires 60 s earlier
CLASSES = {"water": (0x1F, 0x78, 0xB4), "vegetation": (0x33, 0xA0, 0x2C), "built-up": (0xE3, 0x1A, 0x1C)}


def _require_desktop_tools() -> None:
    missing = [tool for tool in ("qgis", "xvfb-run", "Xvfb", "xauth") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the desktop test needs the QGIS desktop and Xvfb; install "
                    "them with 'apt-get install -y --no-install-recommends qgis xvfb xauth' (scripts/setup.sh "
                    "does this).")


def _install_plugin(profiles: Path, dist: Path) -> Path:
    """Build the plugin zip, unzip it into the fresh profile's plugin folder and enable it there."""
    done = subprocess.run([str(REPO / "scripts" / "build_plugin.sh"), str(dist)], capture_output=True,  # noqa: S603
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    profile = profiles / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(done.stdout.strip()) as zf:
        zf.extractall(plugins)
    (profile / "QGIS").mkdir()
    # what Plugins > Manage and Install Plugins > Install from ZIP leaves behind: the plugin enabled
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nexplora_geo_qgis=true\n\n"
                                                "[qgis]\ncheckVersion=false\n")
    return plugins


@pytest.fixture(scope="module")
def desktop(bundle: dict, t33uuu_vrt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One desktop session running classify from its dialog; returns the session's report (+ ``_dir``)."""
    _require_desktop_tools()
    root = tmp_path_factory.mktemp("desktop")
    profiles = root / "profiles"
    plugins = _install_plugin(profiles, root / "dist")
    shots = root / "screenshots"
    shots.mkdir()
    report_path = root / "report.json"
    config = {"report": str(report_path), "screenshots": str(shots), "input": str(t33uuu_vrt),
              "input_name": "T33UUU", "algorithm": "explora_geo:classify", "timeout_s": TIMEOUT_S - 60,
              "parameters": {"MODEL": str(bundle["classifier"]), "BATCH_SIZE": 64}}
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "PYTHONPATH")}
    # QGIS's Python is Debian's python3; onnxruntime lives in .venv-qgis (the user's 'pip install onnxruntime')
    env.update(EXPLORA_DESKTOP_CONFIG=str(config_path), PYTHONPATH=sysconfig.get_paths()["purelib"])
    command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--profiles-path", str(profiles),
               "--profile", "default", "--nologo", "--noversioncheck", "--code", str(SESSION)]
    log_path = root / "qgis.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                   start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # QGIS, Xvfb and xvfb-run share the session's process group: none outlives the test
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    print(f"desktop session output (screenshots, report, QGIS log): {root}")
    log_tail = log_path.read_text(errors="replace")[-3000:]
    if not report_path.exists():
        pytest.fail(f"QGIS wrote no report (exit code {returncode}, None = killed after {TIMEOUT_S} s); "
                    f"its output:\n{log_tail}")
    report = json.loads(report_path.read_text())
    assert not report["errors"], "\n".join(report["errors"]) + f"\nQGIS output:\n{log_tail}"
    return {**report, "_dir": root, "_plugins": plugins, "_returncode": returncode}


def test_plugin_installed_from_the_zip_into_a_fresh_profile(desktop: dict) -> None:
    assert desktop["qgis_version"].startswith("3.22")
    assert desktop["plugin_active"]
    assert Path(desktop["plugin_file"]).resolve().is_relative_to(desktop["_plugins"].resolve())
    assert {"explora_geo:classify", "explora_geo:embed", "explora_geo:similarity"} <= set(desktop["algorithms"])
    assert desktop["_returncode"] == 0  # QGIS quit by itself, within the time limit


def test_dialog_runs_and_loads_named_outputs_with_the_class_map_on_top(desktop: dict) -> None:
    assert desktop["clicked"] == "run button"
    assert desktop["successful"] is True
    assert "tiles/s" in desktop["log"] and "CPUExecutionProvider" in desktop["log"]
    assert desktop["results"]["TILES_RUN"] == 48 * 24
    layers = desktop["layers"]
    assert [lay["name"] for lay in layers] == ["T33UUU — classes (classifier)", "T33UUU — tile grid (classifier)",
                                               "T33UUU — probability (classifier)", "T33UUU"]
    assert all(lay["valid"] and lay["visible"] for lay in layers)
    assert layers[0]["renderer"] == "paletted" and layers[0]["classes"] == list(CLASSES)
    assert layers[1]["renderer"] == "categorizedSymbol"
    assert layers[2]["renderer"] == "singlebandgray"


def _rgb(path: str) -> np.ndarray:
    from osgeo import gdal

    ds = gdal.Open(path)
    assert ds is not None, path
    pixels = ds.ReadAsArray()[:3].transpose(1, 2, 0)  # [H, W, 3]
    ds = None
    return pixels


def test_screenshots_show_the_dialog_and_the_coloured_class_map(desktop: dict) -> None:
    shots = desktop["screenshots"]
    for name in ("dialog_parameters", "dialog_log", "map_canvas", "main_window"):
        assert shots.get(name) and Path(shots[name]).is_file(), name
    dialog = _rgb(shots["dialog_parameters"])
    assert dialog.shape[0] > 300 and dialog.shape[1] > 300 and dialog.std() > 10  # a drawn dialog, not blank
    canvas = _rgb(shots["map_canvas"])
    in_class_colour = np.zeros(canvas.shape[:2], bool)
    for colour in CLASSES.values():
        in_class_colour |= (np.abs(canvas.astype(int) - colour).max(axis=-1) <= 3)
    # the map is zoomed to the class layer: the class colours fill it, the grey probability raster is beneath
    assert in_class_colour.mean() > 0.5, f"only {in_class_colour.mean():.1%} of the map is in class colours"

"""Runs INSIDE the real QGIS desktop (``qgis --code desktop_session.py``), started by ``test_desktop.py``.

It does what a new user does: adds a raster, opens an explora_geo algorithm dialog from Processing, fills in
the model, clicks *Run*, and waits for the outputs to load. It writes what it observes (plugin origin,
provider, dialog log, loaded layers top to bottom with their renderers) to the JSON report named by the
``EXPLORA_DESKTOP_CONFIG`` file, saves screenshots of the dialog and the map, and quits QGIS. Any error, or
the watchdog firing, is written to the report too, so the test can say what went wrong.

Config (JSON): ``report``, ``screenshots`` (folder), ``input``, ``input_name``, ``algorithm``,
``parameters`` (besides ``INPUT``), ``timeout_s``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import processing
from qgis.core import Qgis, QgsApplication, QgsProject
from qgis.PyQt.QtCore import QEventLoop, QTimer
from qgis.PyQt.QtWidgets import QApplication, QTextEdit
from qgis.utils import active_plugins, iface

CONFIG = json.loads(Path(os.environ["EXPLORA_DESKTOP_CONFIG"]).read_text())
SHOTS = Path(CONFIG["screenshots"])
REPORT: dict[str, Any] = {"steps": [], "errors": [], "screenshots": {}}
STATE: dict[str, Any] = {}  # Python objects that must outlive this script's top level (layer, dialog, timers)


def step(name: str) -> None:
    REPORT["steps"].append([name, round(time.monotonic() - START, 2)])


def write_report() -> None:
    tmp = Path(CONFIG["report"] + ".partial")
    tmp.write_text(json.dumps(REPORT, indent=1, default=str))
    os.replace(tmp, CONFIG["report"])


def finish() -> None:
    """Write the report and quit QGIS as File > Exit does (a bare QApplication.quit() makes QGIS 3.22 crash in
    its destructor), with no question asked."""
    step("quit")
    write_report()
    STATE.pop("input", None)
    QgsProject.instance().removeAllMapLayers()  # else QGIS asks whether to drop the temporary outputs
    QgsProject.instance().setDirty(False)
    QTimer.singleShot(0, iface.actionExit().trigger)
    # File > Exit returns to the event loop; if QGIS is still here 20 s later, say what holds it and go
    timer = STATE["exit_timer"] = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(exit_stuck)
    timer.start(20000)


def exit_stuck() -> None:
    windows = [f"{type(w).__name__} '{w.windowTitle()}'" for w in QApplication.topLevelWidgets() if w.isVisible()]
    REPORT["errors"].append(f"QGIS did not exit within 20 s of File > Exit; visible windows: {windows}")
    for w in QApplication.topLevelWidgets():
        if w.isVisible() and w is not iface.mainWindow():
            shot(w, "stuck_" + type(w).__name__)
    write_report()
    os._exit(3)


def guarded(func: Any) -> Any:
    """Run ``func``; on an exception record it and quit."""
    def wrapper(*args: Any) -> None:
        try:
            func(*args)
        except Exception:  # noqa: BLE001 (any error is recorded for the test, which fails on it)
            REPORT["errors"].append(traceback.format_exc())
            finish()
    return wrapper


def wait(ms: int) -> None:
    """Let the event loop run (rendering, signals) for ``ms`` milliseconds."""
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec_()


def shot(widget: Any, name: str) -> None:
    path = SHOTS / f"{name}.png"
    ok = widget.grab().save(str(path))
    REPORT["screenshots"][name] = str(path) if ok else None


def canvas_shot(name: str) -> None:
    """Render the map canvas to completion, then save it."""
    canvas = iface.mapCanvas()
    loop = QEventLoop()
    canvas.mapCanvasRefreshed.connect(loop.quit)
    QTimer.singleShot(20000, loop.quit)  # never hang on a render that does not finish
    canvas.refreshAllLayers()
    loop.exec_()
    canvas.mapCanvasRefreshed.disconnect(loop.quit)
    path = SHOTS / f"{name}.png"
    canvas.saveAsImage(str(path))
    REPORT["screenshots"][name] = str(path) if path.exists() else None


def layer_tree() -> list[dict]:
    out = []
    for node in QgsProject.instance().layerTreeRoot().findLayers():
        layer = node.layer()
        renderer = layer.renderer() if layer is not None else None
        out.append({"name": node.name(), "visible": node.isVisible(), "valid": layer is not None and layer.isValid(),
                    "source": layer.source() if layer is not None else None,
                    "renderer": renderer.type() if renderer is not None else None,
                    "classes": [c.label for c in renderer.classes()] if hasattr(renderer, "classes") else None})
    return out


@guarded
def start() -> None:
    step("start")
    module = sys.modules.get("explora_geo_qgis")
    REPORT["plugin_active"] = "explora_geo_qgis" in active_plugins
    REPORT["plugin_file"] = getattr(module, "__file__", None)
    provider = QgsApplication.processingRegistry().providerById("explora_geo")
    REPORT["algorithms"] = sorted(a.id() for a in provider.algorithms()) if provider is not None else None
    REPORT["qgis_version"] = Qgis.QGIS_VERSION
    layer = iface.addRasterLayer(CONFIG["input"], CONFIG["input_name"])
    if layer is None or not layer.isValid():
        raise RuntimeError(f"could not add {CONFIG['input']}")
    STATE["input"] = layer
    step("input added")
    dialog = processing.createAlgorithmDialog(CONFIG["algorithm"], {"INPUT": layer, **CONFIG["parameters"]})
    if dialog is None:
        raise RuntimeError(f"no dialog for {CONFIG['algorithm']} (algorithm not registered?)")
    STATE["dialog"] = dialog
    dialog.resize(900, 760)
    dialog.show()
    wait(1500)
    shot(dialog, "dialog_parameters")
    step("dialog shown")
    dialog.algorithmFinished.connect(on_finished)
    REPORT["dialog_title"] = dialog.windowTitle()
    run_button = dialog.runButton() if hasattr(dialog, "runButton") else None
    REPORT["clicked"] = "run button" if run_button is not None else "runAlgorithm()"
    if run_button is not None:
        run_button.click()
    else:
        dialog.runAlgorithm()
    step("run clicked")


@guarded
def on_finished(successful: bool, results: dict) -> None:
    step("algorithm finished")
    dialog = STATE["dialog"]
    REPORT["successful"] = bool(successful)
    REPORT["results"] = {k: (v if isinstance(v, (int, float, str, type(None))) else str(v))
                         for k, v in results.items()}
    log = dialog.findChild(QTextEdit, "txtLog")  # the dialog's Log tab
    REPORT["log"] = log.toPlainText() if log is not None else None
    shot(dialog, "dialog_log")  # the dialog closes right after this signal when the run succeeded
    QTimer.singleShot(500, after_loading)


@guarded
def after_loading() -> None:
    step("outputs loaded")
    REPORT["layers"] = layer_tree()
    top = QgsProject.instance().layerTreeRoot().findLayers()
    canvas = iface.mapCanvas()
    if top:
        canvas.setExtent(canvas.mapSettings().layerExtentToOutputExtent(top[0].layer(), top[0].layer().extent()))
    canvas_shot("map_canvas")
    shot(iface.mainWindow(), "main_window")
    REPORT["dialog_visible_after_run"] = STATE["dialog"].isVisible()
    finish()


def watchdog() -> None:
    REPORT["errors"].append(f"timed out after {CONFIG['timeout_s']} s; steps done: {REPORT['steps']}")
    try:
        REPORT["layers"] = layer_tree()
    finally:
        finish()


START = time.monotonic()
_watchdog = QTimer()
_watchdog.setSingleShot(True)
_watchdog.timeout.connect(watchdog)
_watchdog.start(int(CONFIG["timeout_s"] * 1000))
STATE["watchdog"] = _watchdog
QTimer.singleShot(1000, start)  # let the main window finish showing

"""Execution provider and thread choice of OnnxModel (core/model.py): CPU, CUDA when offered, and what an
unavailable CUDA does (``cuda`` refuses with one line, ``auto`` falls back to the CPU and says why)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from explora_geo_qgis.core.errors import PluginError
from explora_geo_qgis.core.model import CPU, CUDA, OnnxModel

pytestmark = pytest.mark.skipif(CUDA in onnxruntime.get_available_providers(),
                                reason="these tests need an onnxruntime without CUDA (the plugin suite's own)")


def test_cpu_and_thread_count(bundle: dict) -> None:
    batch = np.random.default_rng(0).normal(size=(4, 10, 32, 32)).astype(np.float32)
    default = OnnxModel(bundle["embedder"])
    one = OnnxModel(bundle["embedder"], device="cpu", threads=1)
    assert default.execution_provider == one.execution_provider == CPU
    assert default.device_note is None and one.device_note is None
    assert one.threads == 1 and one.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(one.run(batch)["embedding"], default.run(batch)["embedding"], rtol=1e-5, atol=1e-5)


def test_cuda_missing_from_onnxruntime_refuses_with_one_line(bundle: dict) -> None:
    with pytest.raises(PluginError, match=r"CUDA was chosen but this onnxruntime offers only .*CPUExecutionProvider; "
                                          r"install onnxruntime-gpu .*or choose CPU\.") as err:
        OnnxModel(bundle["embedder"], device="cuda")
    assert "\n" not in str(err.value)
    assert OnnxModel(bundle["embedder"], device="auto").execution_provider == CPU  # auto: CPU, nothing to say


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider")
def test_cuda_offered_but_not_starting(bundle: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # an onnxruntime that lists CUDA whose libraries are missing: the session comes up on the CPU only
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(PluginError, match="offers CUDA but could not start it.*choose CPU") as err:
        OnnxModel(bundle["embedder"], device="cuda")
    assert "\n" not in str(err.value)
    auto = OnnxModel(bundle["embedder"], device="auto")
    assert auto.execution_provider == CPU
    assert auto.device_note is not None and auto.device_note.endswith("running on the CPU.")


def test_bad_device_or_threads(bundle: dict, tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="not one of auto, cpu, cuda"):
        OnnxModel(bundle["embedder"], device="gpu")
    with pytest.raises(PluginError, match="negative"):
        OnnxModel(bundle["embedder"], threads=-1)

"""An exported explora-geo ONNX model: its metadata and an ONNX Runtime session.

The bundle (``docs/architecture.md``): input ``image`` ``[N, C, H, W]`` float32, already scaled; outputs
``embedding`` ``[N, D]`` and, for classifiers, ``probabilities`` ``[N, K]``. Metadata lives in the ONNX
``metadata_props`` as JSON strings (also in a ``<model>.json`` sidecar).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import PluginError
from .scaling import Scaler

ORT_INSTALL_HINT = (
    "the Python package onnxruntime is missing from QGIS's Python; install it into that Python, e.g. "
    "'python3 -m pip install onnxruntime' (Windows: run it in the OSGeo4W Shell; Debian/Ubuntu: "
    "'pip install --user onnxruntime' with the system python3), then restart QGIS."
)
REQUIRED_KEYS = ("model_type", "bands", "tile_size", "gsd_m", "normalization", "embedding_dim")


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a :class:`PluginError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise PluginError(ORT_INSTALL_HINT) from err
    return onnxruntime


@dataclass(frozen=True)
class ModelInfo:
    """Parsed model metadata.

    Attributes:
        model_type: ``"classifier"`` or ``"embedder"``.
        bands: input band names, in input channel order.
        tile_size: input height = width, pixels.
        gsd_m: ground sample distance the model expects, metres per pixel.
        embedding_dim: D, length of the ``embedding`` output.
        class_names: K names (classifiers), else empty.
        class_colors: K ``"#rrggbb"`` colours (classifiers), else empty.
        scaler: the input scaling.
        raw: every metadata entry, JSON-decoded.
    """

    model_type: str
    bands: tuple[str, ...]
    tile_size: int
    gsd_m: float
    embedding_dim: int
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    scaler: Scaler
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def is_classifier(self) -> bool:
        return self.model_type == "classifier"

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Per-tile shape of output ``name`` (``embedding``: ``(D,)``, ``probabilities``: ``(K,)``)."""
        if name == "embedding":
            return (self.embedding_dim,)
        if name == "probabilities":
            return (len(self.class_names),)
        raise PluginError(f"the model metadata does not give the shape of output {name!r}; re-export the model.")

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], source: str = "the model") -> ModelInfo:
        """Parse ONNX ``metadata_props`` (string -> JSON string)."""
        raw: dict[str, Any] = {}
        for key, value in props.items():
            try:
                raw[key] = json.loads(value)
            except (TypeError, ValueError):
                raw[key] = value
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise PluginError(f"{source} has no explora-geo metadata ({', '.join(missing)} missing); "
                              "export it with 'explora-geo export --format onnx'.")
        bands = tuple(str(b) for b in raw["bands"])
        scaler = Scaler.from_dict(raw["normalization"])
        if scaler.bands and tuple(scaler.bands) != bands:
            order = {b: i for i, b in enumerate(scaler.bands)}
            if set(order) != set(bands):
                raise PluginError(f"{source}: normalisation bands {list(scaler.bands)} differ from the input "
                                  f"bands {list(bands)}; re-export the model.")
            scaler = scaler.select([order[b] for b in bands])
        names = tuple(str(c) for c in raw.get("class_names") or ())
        colors = tuple(str(c) for c in raw.get("class_colors") or ())
        if raw["model_type"] == "classifier" and not names:
            raise PluginError(f"{source} is a classifier without class_names; re-export it with a head.")
        if len(colors) != len(names):
            colors = default_colors(len(names))
        return cls(str(raw["model_type"]), bands, int(raw["tile_size"]), float(raw["gsd_m"]),
                   int(raw["embedding_dim"]), names, colors, scaler, raw)


def default_colors(k: int) -> tuple[str, ...]:
    """``k`` distinct ``#rrggbb`` colours (evenly spaced hues)."""
    import colorsys

    out = []
    for i in range(k):
        r, g, b = colorsys.hsv_to_rgb(i / max(k, 1), 0.65, 0.9)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return tuple(out)


#: execution device choices: ``auto`` (CUDA when onnxruntime offers it and it starts, else CPU), ``cpu``, ``cuda``
DEVICES = ("auto", "cpu", "cuda")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class OnnxModel:
    """An ONNX Runtime session over an exported explora-geo model.

    Args:
        path: the ``.onnx`` file.
        device: one of :data:`DEVICES`. ``cuda`` refuses (:class:`PluginError`) when onnxruntime does not offer
            CUDA or cannot start it; ``auto`` then runs on the CPU and says why in :attr:`device_note`.
        threads: intra-op threads (0 = onnxruntime's default: one per physical core).
    """

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0) -> None:
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise PluginError(f"model file {path} does not exist; choose the .onnx file that "
                              "'explora-geo export' wrote.")
        if device not in DEVICES:
            raise PluginError(f"device {device!r} is not one of {', '.join(DEVICES)}.")
        if threads < 0:
            raise PluginError(f"thread count {threads} is negative; use 0 for onnxruntime's default.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle ONNX Runtime threads sleep instead of spinning: the reader thread (and QGIS itself) needs
        # those CPU cycles; on 2 cores spinning doubled the CPU time of a forward pass without speeding it up.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if device == "cuda" and CUDA not in available:
            raise PluginError(f"CUDA was chosen but this onnxruntime offers only {', '.join(available)}; install "
                              "onnxruntime-gpu (built for your CUDA and cuDNN) into QGIS's Python, or choose CPU.")
        wanted = [CUDA] if device != "cpu" and CUDA in available else []
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[*wanted, CPU])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise PluginError(f"model file {path} cannot be loaded by onnxruntime ({err}); "
                              "re-export it with 'explora-geo export'.") from err
        self.threads = threads
        #: why the run is not on the device asked for (``auto`` only), else ``None``
        self.device_note: str | None = None
        if wanted and self.execution_provider != CUDA:  # offered, but its libraries or the GPU are missing
            reason = ("onnxruntime offers CUDA but could not start it (CUDA/cuDNN libraries or the GPU driver "
                      "missing; see the onnxruntime messages in the QGIS log)")
            if device == "cuda":
                raise PluginError(f"{reason}; fix the CUDA install, or choose CPU.")
            self.device_note = f"{reason}: running on the CPU."
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, source=f"model file {path.name}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "embedding" not in self.output_names:
            raise PluginError(f"model file {path.name} has no 'embedding' output; re-export it with explora-geo.")
        #: a few-shot head stored in the metadata (``linear_head``): applied to ``embedding`` in numpy
        self.head = None
        if "linear_head" in self.info.raw:
            from .linear_head import LinearHead

            self.head = LinearHead.from_metadata(self.info.raw["linear_head"], self.info.embedding_dim,
                                                 source=f"model file {path.name}")
        if self.info.is_classifier and "probabilities" not in self.output_names and self.head is None:
            raise PluginError(f"model file {path.name} is a classifier without a 'probabilities' output; "
                              "re-export it with explora-geo.")

    #: recently opened models, keyed by file identity and session options (see :meth:`open`)
    _cache: ClassVar[OrderedDict[tuple, OnnxModel]] = OrderedDict()
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()
    CACHE_SIZE: ClassVar[int] = 1

    @classmethod
    def open(cls, path: str | Path, *, device: str = "auto", threads: int = 0) -> OnnxModel:
        """An :class:`OnnxModel` for ``path``, reusing the session of the last run when the same file (same size
        and modification time) is opened with the same options.

        Creating a session costs 0.3-1 s for a ViT-S model (graph optimisation, weight packing); a user's second
        run on the same model skips it. ONNX Runtime sessions are safe to run from several threads at once.
        """
        import_onnxruntime()  # says how to install it, also when a session is cached
        try:
            stat = Path(path).stat()
        except OSError:
            return cls(path, device=device, threads=threads)  # the constructor gives the user error
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, device, threads)
        with cls._cache_lock:
            model = cls._cache.get(key)
            if model is not None:
                cls._cache.move_to_end(key)
                return model
        model = cls(path, device=device, threads=threads)
        with cls._cache_lock:
            cls._cache[key] = model
            while len(cls._cache) > cls.CACHE_SIZE:
                cls._cache.popitem(last=False)
        return model

    @classmethod
    def clear_cache(cls) -> None:
        """Forget the sessions kept by :meth:`open` (frees their memory)."""
        with cls._cache_lock:
            cls._cache.clear()

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Per-tile shape of output ``name``: from the graph when it is static, else from the metadata."""
        for output in self.session.get_outputs():
            if output.name == name and output.shape[1:] and all(isinstance(d, int) for d in output.shape[1:]):
                return tuple(int(d) for d in output.shape[1:])
        return self.info.output_shape(name)

    @property
    def execution_provider(self) -> str:
        """The provider that runs the model, e.g. ``"CPUExecutionProvider"`` or ``"CUDAExecutionProvider"``."""
        return str(self.session.get_providers()[0])

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Forward ``batch`` ``[N, C, T, T]`` float32 (scaled); returns output name -> ``[N, ...]`` array."""
        names = list(outputs or self.output_names)
        from_head = self.head is not None and "probabilities" in names
        graph = [n for n in names if n != "probabilities"] + ["embedding"] if from_head else names
        graph = list(dict.fromkeys(graph))
        values = dict(zip(graph, self.session.run(graph, {self.input_name: np.ascontiguousarray(batch,
                                                                                                dtype=np.float32)})))
        if from_head:
            values["probabilities"] = self.head.probabilities(values["embedding"])
        return {name: values[name] for name in names}

"""Export a merged backbone (+ an optional classification head) to an ONNX bundle for the QGIS plugin.

The bundle (contract in ``docs/architecture.md``) is ``model.onnx`` plus ``model.json``:

- input ``image`` ``[N, C, H, W]`` float32, already scaled with the stored ``normalization``;
- output ``embedding`` ``[N, D]`` (the backbone's pooled features) and, for classifiers,
  ``probabilities`` ``[N, K]`` (softmax of the head's logits);
- the batch axis is dynamic; the opset is :data:`ONNX_OPSET` (recorded as ``onnx_opset``);
- metadata in the ONNX ``metadata_props`` (values are JSON strings; Deepness's key names where the meaning
  matches: ``model_type``, ``class_names``, ``resolution`` in cm/px, ``tile_size``) and the same, decoded, in
  the JSON sidecar.

Segmenters: an ``ExploraSegmentationTask`` checkpoint (``torchgeo fit`` with
``configs/torchgeo_segmentation.yaml``) gives a ``segmenter`` bundle: outputs ``embedding`` ``[N, D]`` and
``logits`` ``[N, K, H, W]`` (per-pixel class scores at the input size, before softmax; the task's
``ignore_index`` channel, never trained, is left out), from one backbone pass.

Heads: a linear-probe head written by ``explora-geo probe`` (``explora_geo.downstream.probe.save_head``:
``<stem>.safetensors`` + ``<stem>.json``), whose features (cls tokens of the last blocks, optionally the mean
patch token) are rebuilt inside the graph; or a torchgeo ``ClassificationTask`` checkpoint (``.ckpt``), whose
timm ``head`` acts on the pooled embedding.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from explora_geo.atomic import atomic_paths
from explora_geo.errors import ExploraGeoError
from explora_geo.sensors import get_sensor

__all__ = [
    "ONNX_OPSET",
    "HeadSpec",
    "OnnxBundle",
    "SegmenterBundle",
    "SegmenterSpec",
    "bundle_metadata",
    "export_onnx",
    "load_head_spec",
    "load_model",
    "load_segmenter",
]

#: ONNX opset of exported bundles.
ONNX_OPSET = 17
BUNDLE_FORMAT = "explora-geo-onnx"


@dataclass
class HeadSpec:
    """A linear classification head and the features it reads.

    Attributes:
        linear: ``nn.Linear(F, K)``.
        class_names: K names.
        class_colors: K ``"#rrggbb"`` colours, or ``None`` for a default palette.
        n_last_blocks: the head reads the final-normed cls tokens of this many last blocks ...
        avgpool: ... plus the last block's mean patch token;
        on_embedding: ... or, when True, the pooled embedding itself (torchgeo / timm heads).
        source: where the head came from (for the metadata).
    """

    linear: nn.Linear
    class_names: list[str]
    class_colors: list[str] | None = None
    n_last_blocks: int = 1
    avgpool: bool = False
    on_embedding: bool = False
    source: str = ""


class OnnxBundle(nn.Module):
    """What is exported: ``image [N, C, H, W]`` -> ``embedding [N, D]`` (and ``probabilities [N, K]``).

    One pass through the backbone serves both outputs: the final tokens give the pooled embedding
    (``forward_head(..., pre_logits=True)``), the normed intermediates give a probe head's features
    (the recipe of ``explora_geo.downstream.probe.ProbeClassifier``).
    """

    def __init__(self, backbone: nn.Module, head: HeadSpec | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head.linear if head is not None else None
        self.n_last_blocks = head.n_last_blocks if head is not None else 0
        self.avgpool = bool(head and head.avgpool)
        self.on_embedding = bool(head and head.on_embedding)

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.head is None or self.on_embedding:
            embedding = self.backbone.forward_head(self.backbone.forward_features(image), pre_logits=True)
            if self.head is None:
                return embedding
            return embedding, torch.softmax(self.head(embedding), dim=-1)
        final, intermediates = self.backbone.forward_intermediates(
            image, indices=self.n_last_blocks, return_prefix_tokens=True, norm=True, output_fmt="NLC")
        embedding = self.backbone.forward_head(final, pre_logits=True)
        parts = [prefix[:, 0] for _, prefix in intermediates]
        if self.avgpool:
            parts.append(intermediates[-1][0].mean(dim=1))
        logits = self.head(torch.cat(parts, dim=1))
        return embedding, torch.softmax(logits, dim=-1)


@dataclass
class SegmenterSpec:
    """A trained segmenter and the classes of the logit channels it exports.

    Attributes:
        segmenter: a :class:`explora_geo.downstream.segmentation.ViTSegmenter` (eval mode, LoRA merged).
        class_names: K names, one per exported channel.
        channels: the K decoder output channels exported, in order (the ``ignore_index`` channel is left out).
        class_colors: K ``"#rrggbb"`` colours, or ``None`` for a default palette.
        ignore_index: the task's ignored (unlabelled) class, or ``None``.
        source: where it came from (for the metadata).
    """

    segmenter: nn.Module
    class_names: list[str]
    channels: list[int]
    class_colors: list[str] | None = None
    ignore_index: int | None = None
    source: str = ""


class SegmenterBundle(nn.Module):
    """What is exported for a segmenter: ``image [N, C, H, W]`` -> ``embedding [N, D]``, ``logits
    [N, K, H, W]``. One backbone pass: its final tokens give the pooled embedding, the normed patch-token grids
    of its last blocks feed the decoder (exactly ``ViTSegmenter.forward``)."""

    def __init__(self, spec: SegmenterSpec) -> None:
        super().__init__()
        self.segmenter = spec.segmenter
        self.register_buffer("channels", torch.tensor(spec.channels, dtype=torch.long), persistent=False)
        self.keep_all = spec.channels == list(range(len(spec.channels))) and \
            len(spec.channels) == _decoder_outputs(spec.segmenter)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        backbone = self.segmenter.backbone
        final, grids = backbone.forward_intermediates(image, indices=self.segmenter.n_blocks, norm=True,
                                                      output_fmt="NCHW")
        embedding = backbone.forward_head(final, pre_logits=True)
        logits = self.segmenter.decode(grids, image.shape[-2:])
        return embedding, logits if self.keep_all else logits.index_select(1, self.channels)


def _decoder_outputs(segmenter: nn.Module) -> int:
    return int(segmenter.decoder[-1].out_channels)


def _segmenter_classes(path: Path, hparams: dict[str, Any], k: int) -> tuple[list[str], list[int], int | None]:
    """Names and channels of the exported classes: all ``k`` decoder channels but ``ignore_index``; names
    from ``class_names``/``labels`` (a mask folder's ``k - 1`` classes when channel 0 is the ignored
    'unlabelled'), else ``class_<channel>``."""
    ignore = hparams.get("ignore_index")
    ignore = int(ignore) if ignore is not None and 0 <= int(ignore) < k else None
    channels = [c for c in range(k) if c != ignore]
    names = [str(n) for n in (hparams.get("class_names") or hparams.get("labels") or [])]
    if not names:
        return [f"class_{c}" for c in channels], channels, ignore
    if len(names) == k:
        return [names[c] for c in channels], channels, ignore
    if len(names) == len(channels):
        return names, channels, ignore
    raise ExploraGeoError(f"{path} names {len(names)} classes for {k} output channels (ignore_index {ignore}); "
                          "fix the task's labels (one per class, or one per class but the ignored one).")


def load_segmenter(checkpoint: str | os.PathLike[str], class_colors: Sequence[str] | None = None,
                   ckpt: dict[str, Any] | None = None) -> tuple[SegmenterSpec, dict[str, Any]]:
    """The segmenter of an ``ExploraSegmentationTask`` checkpoint and its backbone sidecar.

    Raises:
        ExploraGeoError: the file is not such a checkpoint (see
            :func:`explora_geo.downstream.segmentation.segmenter_from_checkpoint`), or its class names do not fit.
    """
    from explora_geo.downstream.segmentation import segmenter_from_checkpoint

    path = Path(checkpoint)
    ckpt = ckpt if ckpt is not None else _read_task_checkpoint(path)
    segmenter, sidecar, hparams = segmenter_from_checkpoint(path, ckpt)
    names, channels, ignore = _segmenter_classes(path, hparams, _decoder_outputs(segmenter))
    colors = list(class_colors) if class_colors else hparams.get("class_colors")
    return SegmenterSpec(segmenter, names, channels, colors, ignore, source=f"segmentation:{path.name}"), sidecar


def load_head_spec(path: str | os.PathLike[str], class_colors: Sequence[str] | None = None) -> HeadSpec:
    """Read a probe head (``.safetensors``/``.json``/stem) or a torchgeo task checkpoint (``.ckpt``)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return _torchgeo_head(path, class_colors)  # the head only; see load_model for its backbone
    from explora_geo.downstream.probe import load_head

    linear, meta = load_head(path)
    names = [str(c) for c in meta.get("classes") or []]
    if len(names) != linear.out_features:
        raise ExploraGeoError(f"head {path} lists {len(names)} classes for {linear.out_features} outputs; "
                              "re-run `explora-geo probe`.")
    colors = list(class_colors) if class_colors else meta.get("class_colors")
    return HeadSpec(linear, names, colors, int(meta["n_last_blocks"]), bool(meta["avgpool"]), False,
                    source=f"probe:{path.name}")


def _read_task_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning ``.ckpt`` (tensors and plain hyper-parameters only: ``weights_only`` loading)."""
    if not path.is_file():
        raise ExploraGeoError(f"checkpoint {path} does not exist; pass the .ckpt torchgeo wrote.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ExploraGeoError(f"cannot read {path} as a torchgeo checkpoint ({type(err).__name__}); "
                              "pass a Lightning .ckpt of a torchgeo task.") from err


def _torchgeo_head(path: Path, class_colors: Sequence[str] | None,
                   ckpt: dict[str, Any] | None = None) -> HeadSpec:
    """The timm ``head`` of a torchgeo ``ClassificationTask`` checkpoint (acts on the pooled embedding)."""
    ckpt = ckpt if ckpt is not None else _read_task_checkpoint(path)
    state = ckpt.get("state_dict", {})
    # the timm head, or the trained copy peft keeps for it in a mode="lora" ExploraClassificationTask
    for prefix in ("model.head.", "model.base_model.model.head.modules_to_save.default."):
        weight, bias = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
        if weight is not None:
            break
    if weight is None or bias is None or weight.ndim != 2:
        raise ExploraGeoError(f"{path} has no 'model.head.weight/bias' (not a timm ClassificationTask); "
                              "pass a torchgeo ClassificationTask checkpoint or a probe head.")
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": weight, "bias": bias})
    hparams = ckpt.get("hyper_parameters", {}) or {}
    names = hparams.get("class_names") or hparams.get("labels") or [f"class_{k}" for k in range(weight.shape[0])]
    return HeadSpec(linear.eval(), [str(n) for n in names], list(class_colors) if class_colors else None,
                    on_embedding=True, source=f"torchgeo:{path.name}")


def load_model(
    checkpoint: str | os.PathLike[str],
    head: str | os.PathLike[str] | HeadSpec | None = None,
    class_colors: Sequence[str] | None = None,
) -> tuple[nn.Module, dict[str, Any], HeadSpec | None]:
    """The backbone, its sidecar and the head to export.

    A torchgeo task checkpoint (``.ckpt``, as ``checkpoint`` or as ``head``) that carries an explora-geo
    backbone (``ExploraClassificationTask``) also gives the backbone: the head was trained with that (possibly
    fine-tuned, LoRA-merged) backbone, not with the original file. Its architecture must then match
    ``checkpoint``'s.
    """
    from explora_geo.checkpoint import load_backbone, read_sidecar

    checkpoint = Path(checkpoint)
    head_path = None if head is None or isinstance(head, HeadSpec) else Path(head)
    task_path = checkpoint if checkpoint.suffix == ".ckpt" else (
        head_path if head_path is not None and head_path.suffix == ".ckpt" else None)
    task = _read_task_checkpoint(task_path) if task_path is not None else None
    if task is not None and (task.get("hyper_parameters") or {}).get("backbone_meta"):
        from explora_geo.downstream.tasks import backbone_from_checkpoint

        backbone, sidecar = backbone_from_checkpoint(task_path)
        if checkpoint != task_path:
            given = read_sidecar(checkpoint)
            same = [given.get(k) == sidecar.get(k) for k in ("architecture", "bands")]
            if not all(same):
                raise ExploraGeoError(
                    f"head checkpoint {task_path.name} was trained on a {sidecar.get('architecture')} backbone "
                    f"({len(sidecar.get('bands') or [])} bands), not on {checkpoint.name} "
                    f"({given.get('architecture')}); pass the matching backbone or only --checkpoint {task_path}.")
        return backbone, sidecar, _torchgeo_head(task_path, class_colors, task)
    if task_path is not None and task_path == checkpoint:
        raise ExploraGeoError(f"{checkpoint} has no explora-geo backbone metadata; pass the backbone file "
                              "(.safetensors) as --checkpoint and the .ckpt as --head.")
    backbone, sidecar = load_backbone(checkpoint, num_classes=0)
    if head is None or isinstance(head, HeadSpec):
        return backbone, sidecar, head
    if task is not None:
        return backbone, sidecar, _torchgeo_head(head_path, class_colors, task)
    return backbone, sidecar, load_head_spec(head_path, class_colors)


def _wavelengths(bands: Sequence[str], sensor: str | None) -> list[float | None]:
    """Centre wavelength (nm) of each band, from the sidecar's sensor (Sentinel-2 names by default)."""
    preset = get_sensor(sensor or "sentinel2")
    out: list[float | None] = []
    for name in bands:
        canonical = preset.canonical(name)
        out.append(preset.band(canonical).wavelength_nm if canonical else None)
    return out


def bundle_metadata(sidecar: dict[str, Any], head: HeadSpec | SegmenterSpec | None,
                    embedding_dim: int) -> dict[str, Any]:
    """The bundle metadata (decoded values) from a backbone sidecar and an optional head or segmenter."""
    from explora_geo.normalization import Normalization

    bands = list(sidecar["bands"])
    norm = Normalization.from_dict(sidecar["normalization"]).select(bands)
    colors: list[str] = []
    if head is not None:
        colors = list(head.class_colors or _palette(len(head.class_names)))
        if len(colors) != len(head.class_names):
            raise ExploraGeoError(f"{len(colors)} class colours for {len(head.class_names)} classes "
                                  f"({', '.join(head.class_names)}); give one '#rrggbb' per class.")
    gsd = float(sidecar["gsd_m"])
    size = int(sidecar["img_size"])
    segmenter = isinstance(head, SegmenterSpec)
    model_type = "segmenter" if segmenter else "classifier" if head is not None else "embedder"
    outputs = {"segmenter": ["embedding", "logits"], "classifier": ["embedding", "probabilities"],
               "embedder": ["embedding"]}[model_type]
    extra: dict[str, Any] = {}
    if segmenter:
        extra["segmentation"] = {"output": "logits", "logits_shape": ["N", len(head.class_names), size, size],
                                 "channels": list(head.channels), "ignore_index": head.ignore_index,
                                 "n_blocks": int(head.segmenter.n_blocks)}
    return {
        "format": BUNDLE_FORMAT,
        "format_version": 1,
        "model_type": model_type,
        "class_names": list(head.class_names) if head is not None else [],
        "class_colors": colors,
        "resolution": gsd * 100.0,
        "tile_size": int(sidecar["img_size"]),
        "patch_size": int(sidecar["patch_size"]),
        "bands": bands,
        "wavelengths_nm": _wavelengths(bands, sidecar.get("sensor")),
        "gsd_m": gsd,
        "normalization": norm.to_dict(),
        "embedding_dim": int(embedding_dim),
        "explora": {
            "architecture": sidecar.get("architecture"),
            "source_weights": sidecar.get("source_weights"),
            "objective": sidecar.get("objective"),
            "config": sidecar.get("explora"),
            "head": head.source if head is not None else None,
        },
        "onnx_opset": ONNX_OPSET,
        "inputs": {"image": ["N", len(bands), size, size]},
        "outputs": outputs,
        **extra,
    }


def _palette(k: int) -> list[str]:
    """``k`` colours: matplotlib's tab10/tab20 (hex)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(k)]


def export_onnx(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    head: str | os.PathLike[str] | HeadSpec | None = None,
    class_colors: Sequence[str] | None = None,
    check: bool = True,
    segmenter: bool | None = None,
) -> tuple[Path, Path]:
    """Export a backbone file (+ head), or a segmentation checkpoint, to ``out`` (``.onnx``) and its ``.json``.

    Args:
        checkpoint: a backbone file of ``explora_geo.checkpoint.save_backbone`` (``.safetensors``/``.json``),
            an ``ExploraClassificationTask`` checkpoint (``.ckpt``: backbone and head), or an
            ``ExploraSegmentationTask`` checkpoint (``.ckpt``: a segmenter bundle).
        out: destination ``.onnx`` path; the sidecar is written beside it with the ``.json`` suffix.
        head: a probe head path, a torchgeo ``.ckpt`` (see :func:`load_model`), or a :class:`HeadSpec`.
        class_colors: ``"#rrggbb"`` per class, overriding the head's.
        check: verify the written model with onnxruntime on a batch of 3 random tiles (max |diff| <= 1e-4).
        segmenter: ``True`` requires a segmentation checkpoint, ``False`` refuses one, ``None`` detects it.

    Returns:
        ``(onnx_path, json_path)``.
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExploraGeoError(f"output {out} must end in .onnx; pass e.g. --out model.onnx.")
    _refuse_foreign_json(out.with_suffix(".json"))
    module, sidecar, spec, embedding_dim = _export_module(Path(checkpoint), head, class_colors, segmenter)
    size = int(sidecar["img_size"])
    example = torch.zeros(2, len(sidecar["bands"]), size, size)
    meta = bundle_metadata(sidecar, spec, embedding_dim)
    outputs = meta["outputs"]
    json_path = out.with_suffix(".json")
    with atomic_paths(out, json_path) as (tmp, tmp_json):
        _write_onnx(module, example, str(tmp), outputs, meta)
        if check:
            _check_onnx(module, str(tmp), example.shape[1:], outputs)
        tmp_json.write_text(json.dumps(meta, indent=2))
    return out, json_path


def _export_module(checkpoint: Path, head: str | os.PathLike[str] | HeadSpec | None,
                   class_colors: Sequence[str] | None, segmenter: bool | None,
                   ) -> tuple[nn.Module, dict[str, Any], HeadSpec | SegmenterSpec | None, int]:
    """The module to trace, the backbone sidecar, the head/segmenter spec and the embedding width."""
    ckpt = _read_task_checkpoint(checkpoint) if checkpoint.suffix == ".ckpt" else None
    from explora_geo.downstream.segmentation import is_segmentation_checkpoint

    is_seg = ckpt is not None and is_segmentation_checkpoint(ckpt)
    if segmenter and not is_seg:
        raise ExploraGeoError(f"{checkpoint} is not a segmentation checkpoint (an ExploraSegmentationTask .ckpt "
                              "with model.decoder weights); pass the .ckpt of `torchgeo fit --config "
                              "configs/torchgeo_segmentation.yaml`, or drop --segmenter.")
    if is_seg and segmenter is False:
        raise ExploraGeoError(f"{checkpoint} is a segmentation checkpoint; export it as a segmenter "
                              "(--segmenter) or pass a classification checkpoint.")
    head_path = Path(head) if isinstance(head, (str, os.PathLike)) else None
    if head_path is not None and head_path.suffix == ".ckpt" and is_segmentation_checkpoint(
            _read_task_checkpoint(head_path)):
        raise ExploraGeoError(f"--head {head_path} is a segmentation checkpoint, not a classification head; "
                              f"export it alone: --checkpoint {head_path} --segmenter.")
    if is_seg and head is not None:
        raise ExploraGeoError(f"{checkpoint} is a segmentation checkpoint, which brings its own decoder; "
                              "drop --head.")
    if is_seg:
        spec, sidecar = load_segmenter(checkpoint, class_colors, ckpt)
        _check_plugin_keys(checkpoint, sidecar)
        backbone = spec.segmenter.backbone
        embedding_dim = int(getattr(backbone, "num_features", sidecar["embed_dim"]))
        return SegmenterBundle(spec).eval(), sidecar, spec, embedding_dim
    backbone, sidecar, spec = load_model(checkpoint, head, class_colors)
    _check_plugin_keys(checkpoint, sidecar)
    if spec is not None and class_colors:
        spec.class_colors = list(class_colors)
    embedding_dim = int(getattr(backbone, "num_features", sidecar["embed_dim"]))
    if spec is not None and spec.linear.in_features != _head_inputs(spec, embedding_dim):
        raise ExploraGeoError(f"head expects {spec.linear.in_features} features but the backbone gives "
                              f"{_head_inputs(spec, embedding_dim)}; pass the head trained on this backbone.")
    return OnnxBundle(backbone.eval(), spec).eval(), sidecar, spec, embedding_dim


def _check_plugin_keys(checkpoint: Path, sidecar: dict[str, Any]) -> None:
    """The sidecar entries the QGIS plugin cannot work without."""
    for key in ("gsd_m", "normalization"):
        if sidecar.get(key) is None:
            raise ExploraGeoError(f"backbone {checkpoint} has no '{key}' in its sidecar; the QGIS plugin needs "
                                  "it: set it in the backbone's .json (see docs/architecture.md) and re-export.")


def _refuse_foreign_json(path: Path) -> None:
    """Never overwrite a JSON file that is not an exported bundle's metadata (e.g. the backbone's sidecar,
    which ``out = <backbone stem>.onnx`` would otherwise replace)."""
    if not path.exists():
        return
    try:
        fmt = json.loads(path.read_text()).get("format")
    except (ValueError, AttributeError, OSError):
        fmt = None
    if fmt != BUNDLE_FORMAT:
        raise ExploraGeoError(f"the export would overwrite {path}, which is not an exported model's metadata "
                              f"(format {fmt!r}); choose another --out name.")


def _head_inputs(spec: HeadSpec, embedding_dim: int) -> int:
    if spec.on_embedding:
        return embedding_dim
    return embedding_dim * (spec.n_last_blocks + int(spec.avgpool))


def _write_onnx(module: nn.Module, example: Tensor, path: str, outputs: list[str], meta: dict[str, Any]) -> None:
    """TorchScript-based export with a dynamic batch axis, then metadata_props."""
    import onnx

    dynamic = {"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks in the models become constants for the fixed C, H, W: expected, not a problem
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), path, input_names=["image"], output_names=outputs,
                          dynamic_axes=dynamic, opset_version=ONNX_OPSET, dynamo=False)
    model = onnx.load(path)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    model.producer_name = "explora-geo"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _check_onnx(module: nn.Module, path: str, chw: torch.Size, outputs: list[str]) -> None:
    """Compare onnxruntime with torch on 3 random tiles (a batch size other than the traced one)."""
    import onnxruntime as ort

    x = torch.rand(3, *chw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(outputs, {"image": x.numpy()})
    for name, want, have in zip(outputs, expected, got):
        diff = float((torch.from_numpy(have) - want).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"ONNX output {name} differs from torch by {diff:.2e} (> 1e-4)")

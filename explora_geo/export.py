"""Export a merged backbone (+ an optional classification head) to an ONNX bundle for the QGIS plugin.

The bundle (contract in ``docs/architecture.md``) is ``model.onnx`` plus ``model.json``:

- input ``image`` ``[N, C, H, W]`` float32, already scaled with the stored ``normalization``;
- output ``embedding`` ``[N, D]`` (the backbone's pooled features) and, for classifiers,
  ``probabilities`` ``[N, K]`` (softmax of the head's logits);
- the batch axis is dynamic; the opset is :data:`ONNX_OPSET` (recorded as ``onnx_opset``);
- metadata in the ONNX ``metadata_props`` (values are JSON strings; Deepness's key names where the meaning
  matches: ``model_type``, ``class_names``, ``resolution`` in cm/px, ``tile_size``) and the same, decoded, in
  the JSON sidecar.

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

__all__ = ["ONNX_OPSET", "HeadSpec", "OnnxBundle", "load_head_spec", "load_model", "bundle_metadata",
           "export_onnx"]

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
                              "pass a Lightning .ckpt of a ClassificationTask.") from err


def _torchgeo_head(path: Path, class_colors: Sequence[str] | None,
                   ckpt: dict[str, Any] | None = None) -> HeadSpec:
    """The timm ``head`` of a torchgeo ``ClassificationTask`` checkpoint (acts on the pooled embedding)."""
    ckpt = ckpt if ckpt is not None else _read_task_checkpoint(path)
    state = ckpt.get("state_dict", {})
    weight, bias = state.get("model.head.weight"), state.get("model.head.bias")
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


def bundle_metadata(sidecar: dict[str, Any], head: HeadSpec | None, embedding_dim: int) -> dict[str, Any]:
    """The bundle metadata (decoded values) from a backbone sidecar and an optional head."""
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
    return {
        "format": BUNDLE_FORMAT,
        "format_version": 1,
        "model_type": "classifier" if head is not None else "embedder",
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
        "inputs": {"image": ["N", len(bands), int(sidecar["img_size"]), int(sidecar["img_size"])]},
        "outputs": ["embedding", "probabilities"] if head is not None else ["embedding"],
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
) -> tuple[Path, Path]:
    """Export a backbone file (+ head) to ``out`` (``.onnx``) and its ``.json`` sidecar.

    Args:
        checkpoint: a backbone file of ``explora_geo.checkpoint.save_backbone`` (``.safetensors``/``.json``),
            or an ``ExploraClassificationTask`` checkpoint (``.ckpt``: backbone and head).
        out: destination ``.onnx`` path; the sidecar is written beside it with the ``.json`` suffix.
        head: a probe head path, a torchgeo ``.ckpt`` (see :func:`load_model`), or a :class:`HeadSpec`.
        class_colors: ``"#rrggbb"`` per class, overriding the head's.
        check: verify the written model with onnxruntime on a batch of 2 random tiles (max |diff| <= 1e-4).

    Returns:
        ``(onnx_path, json_path)``.
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExploraGeoError(f"output {out} must end in .onnx; pass e.g. --out model.onnx.")
    _refuse_foreign_json(out.with_suffix(".json"))
    backbone, sidecar, spec = load_model(checkpoint, head, class_colors)
    for key in ("gsd_m", "normalization"):
        if sidecar.get(key) is None:
            raise ExploraGeoError(f"backbone {checkpoint} has no '{key}' in its sidecar; the QGIS plugin needs "
                                  "it: set it in the backbone's .json (see docs/architecture.md) and re-export.")
    if spec is not None and class_colors:
        spec.class_colors = list(class_colors)
    embedding_dim = int(getattr(backbone, "num_features", sidecar["embed_dim"]))
    if spec is not None and spec.linear.in_features != _head_inputs(spec, embedding_dim):
        raise ExploraGeoError(f"head expects {spec.linear.in_features} features but the backbone gives "
                              f"{_head_inputs(spec, embedding_dim)}; pass the head trained on this backbone.")
    module = OnnxBundle(backbone.eval(), spec).eval()
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

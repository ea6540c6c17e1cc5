"""torchgeo task integration: ExPLoRA backbones in ``torchgeo.tasks.Classification`` and ``torchgeo fit``.

:class:`ExploraClassificationTask` is a ``torchgeo.tasks.Classification`` that

- imports :mod:`explora_geo.models` (so ``group_channel_vit_*`` names exist in timm when ``torchgeo fit``
  builds it from a YAML ``class_path``);
- takes ``weights`` as a backbone file (``.safetensors``/``.json``), a :func:`backbone_weights` entry, a
  timm name registered with :func:`register_backbone` (``weights=True``), or torchgeo's own forms; backbone
  files are loaded with a check (never a silent ``strict=False``) and the backbone's sidecar is stored in the
  hyper-parameters, so a checkpoint can be rebuilt, probed and exported without the original file;
- fine-tunes in one of three modes: ``full`` (every parameter), ``lora`` (the paper's "LoRA-r8" baseline:
  ordinary LoRA of rank ``lora_rank`` through peft, on ``lora_targets`` = timm's fused attention projection
  ``qkv`` of every block by default, plus the head), ``linear_probe`` (frozen backbone, head only). A
  ``lora`` run ends with a standard peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  that ``peft.PeftModel.from_pretrained(backbone, folder)`` loads onto the backbone.

ExPLoRA's own pre-training adapter (:mod:`explora_geo.adapter`, LoRA on the Q and V rows only, unfrozen
blocks, norms) is a different thing and stays there: see docs/adapter.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchgeo.tasks import Classification

import explora_geo.models  # noqa: F401  (registers our timm models before torchgeo/timm look them up)
from explora_geo.errors import ExploraGeoError

__all__ = [
    "MODES",
    "check_mode",
    "ExploraTaskMixin",
    "ExploraClassificationTask",
    "configure_finetuning",
    "LORA_TARGETS",
    "merge_lora",
    "save_lora_adapter",
    "resolve_backbone_meta",
    "build_backbone",
    "backbone_from_checkpoint",
]

Mode = Literal["full", "lora", "linear_probe"]
MODES: tuple[str, ...] = ("full", "lora", "linear_probe")
#: peft ``target_modules`` of ``mode="lora"``: timm's fused ``attn.qkv`` of every block (one low-rank pair on
#: Q, K and V together: ordinary LoRA on the attention projection, what peft does on a timm ViT).
LORA_TARGETS: tuple[str, ...] = ("qkv",)


def _is_backbone_path(weights: Any) -> bool:
    if not isinstance(weights, (str, os.PathLike)):
        return False
    from explora_geo.checkpoint import backbone_paths

    return Path(weights).suffix in (".safetensors", ".json") or backbone_paths(weights)[1].is_file()


def check_mode(mode: str) -> None:
    """Raise unless ``mode`` is a fine-tuning mode (:data:`MODES`)."""
    if mode not in MODES:
        raise ExploraGeoError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}.")


def configure_finetuning(model: nn.Module, mode: str, *, head: nn.Module | None = None, lora_rank: int = 8,
                         lora_alpha: float = 1.0, lora_targets: Sequence[str] = LORA_TARGETS) -> nn.Module:
    """Set which parameters of a backbone ``model`` (and its task ``head``) train; returns the model to use.

    ``full``: all. ``linear_probe``: only ``head`` (default: the classifier, ``model.get_classifier()``).
    ``lora``: ``peft.get_peft_model`` with ``LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
    target_modules=lora_targets)`` (scale ``lora_alpha / lora_rank``); the model's own classifier is a peft
    ``modules_to_save`` (it trains and is saved with the adapter), an external ``head`` (a segmentation
    decoder) just trains. Everything else is frozen. The returned model is then a ``peft.PeftModel`` (timm
    methods such as ``forward_features`` pass through to the backbone); the other modes return ``model``.

    Raises:
        ExploraGeoError: unknown mode, or ``lora_targets`` matching no module of the model.
    """
    check_mode(mode)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        own_head = head is None and any(True for _ in model.get_classifier().parameters())
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets), lora_dropout=0.0,
                            bias="none", modules_to_save=[classifier] if own_head else None)
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise ExploraGeoError(f"LoRA targets {list(lora_targets)} do not fit {type(model).__name__} ({err}); "
                                  "use module names such as qkv, proj, fc1, fc2.") from None
        if head is not None:
            head.requires_grad_(True)
        return model
    head = model.get_classifier() if head is None else head
    model.requires_grad_(mode == "full")
    head.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain copy of ``model``: a peft model's LoRA merged into the weights (``merge_and_unload``, the trained
    classifier kept), or a deep copy of any other model. ``model`` is not changed."""
    import copy

    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def save_lora_adapter(model: nn.Module, folder: str | os.PathLike[str], *,
                      base_model: str | None = None) -> tuple[Path, Path]:
    """Save a ``mode="lora"`` backbone as a standard peft adapter: ``folder/adapter_config.json`` +
    ``folder/adapter_model.safetensors`` (both moved into place together, atomically). Load it with
    ``peft.PeftModel.from_pretrained(backbone, folder)`` onto a backbone built from the same backbone file.

    Args:
        model: the ``peft.PeftModel`` of :func:`configure_finetuning`.
        folder: output folder (created).
        base_model: recorded as the adapter's ``base_model_name_or_path`` (e.g. the backbone file).

    Raises:
        ExploraGeoError: ``model`` is not a peft model (not fine-tuned with ``mode="lora"``).
    """
    import shutil
    import tempfile

    from peft import PeftModel

    from explora_geo.atomic import atomic_paths

    if not isinstance(model, PeftModel):
        raise ExploraGeoError(f"{type(model).__name__} has no LoRA adapter; fine-tune with mode='lora' to save one.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if base_model is not None:
        model.peft_config["default"].base_model_name_or_path = str(base_model)
    names = ("adapter_config.json", "adapter_model.safetensors")
    scratch = Path(tempfile.mkdtemp(prefix=".peft-", dir=folder))
    try:
        model.save_pretrained(scratch, save_embedding_layers=False)  # a ViT has no token embeddings
        with atomic_paths(*(folder / n for n in names)) as temps:
            for name, temp in zip(names, temps, strict=True):
                os.replace(scratch / name, temp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / names[0], folder / names[1]


def resolve_backbone_meta(weights: Any, backbone_meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The backbone sidecar (with ``weights_file``) behind a task's ``weights``, if it is one of ours.

    ``weights`` may be a backbone file path or a :func:`backbone_weights` entry; otherwise the stored
    ``backbone_meta`` (a checkpoint's) is returned, or ``None`` (a plain timm / torchgeo model).
    """
    from explora_geo.downstream.backbones import read_backbone_meta

    if _is_backbone_path(weights):
        return read_backbone_meta(weights)
    value = getattr(weights, "value", None)
    if isinstance(getattr(value, "meta", None), dict) and "weights_file" in value.meta:
        return dict(value.meta)
    return dict(backbone_meta) if backbone_meta else None


def build_backbone(meta: dict[str, Any], weights: Any, num_classes: int) -> nn.Module:
    """The sidecar's architecture with a ``num_classes`` head: loaded (checked) from its file when
    ``weights`` is set, randomly initialised otherwise (e.g. before a checkpoint's state is loaded)."""
    if weights is None or weights is False:
        from explora_geo.checkpoint import build_from_sidecar

        model = build_from_sidecar({**meta, "model_kwargs": dict(meta.get("model_kwargs") or {})},
                                   num_classes=num_classes)
    else:
        from explora_geo.checkpoint import load_backbone

        model, _ = load_backbone(meta["weights_file"], num_classes=num_classes)
    model.band_names = list(meta["bands"])
    return model


class ExploraTaskMixin:
    """What our torchgeo tasks share: backbone files as ``weights`` (sidecar kept for the checkpoint), an
    optimiser over the trainable parameters only, and class names taken from the datamodule."""

    _backbone_meta: dict[str, Any] | None

    def _resolve_backbone(self, model: str, weights: Any, in_channels: int | None, num_classes: int | None, *,
                          mode: str, task: str, backbone_meta: dict[str, Any] | None) -> tuple[str, int]:
        """Check the arguments our tasks share; when ``weights`` is an explora-geo backbone (or a checkpoint
        stored its sidecar), take the architecture and the input channels from the sidecar, which is kept
        as ``_backbone_meta``. Returns ``(model, in_channels)``; called before the task's ``__init__``.

        Raises:
            ExploraGeoError: unknown mode, fewer than two classes, ``in_channels`` unlike the backbone's.
        """
        check_mode(mode)
        if task == "multiclass" and (not num_classes or num_classes < 2):
            raise ExploraGeoError(f"num_classes must be at least 2, got {num_classes!r}.")
        meta = resolve_backbone_meta(weights, backbone_meta)
        if meta is not None:
            from explora_geo.downstream.backbones import check_in_chans

            check_in_chans(meta, in_channels)
            in_channels, model = len(meta["bands"]), meta["architecture"]
        self._backbone_meta = meta
        return model, in_channels or 3

    def _num_outputs(self) -> int:
        """Width of the task's output layer (torchgeo's rule)."""
        return self.hparams["num_classes"] or self.hparams["num_labels"] or 1

    def _build_backbone(self, num_classes: int, timm_model: Callable[[], nn.Module]) -> nn.Module:
        """The backbone with a ``num_classes`` head: rebuilt from the sidecar (checked loading) when there is
        one, else ``timm_model()``, whose sidecar (a name from :func:`register_backbone`) is then kept so the
        checkpoint can be rebuilt anywhere."""
        if self._backbone_meta is not None:
            return build_backbone(self._backbone_meta, self.weights, num_classes)
        model = timm_model()
        self._backbone_meta = getattr(model, "explora_sidecar", None)
        return model

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable parameters only, with torchgeo's plateau schedule."""
        from torch.optim import AdamW
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        optimizer = AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams["lr"])
        scheduler = ReduceLROnPlateau(optimizer, patience=self.hparams["patience"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}

    def lora_backbone(self) -> nn.Module:
        """The backbone (a ``peft.PeftModel`` in ``mode="lora"``)."""
        return self.model

    def on_fit_end(self) -> None:
        """``mode="lora"``: save the peft adapter to ``<log dir>/lora_adapter/`` (see :func:`save_lora_adapter`)."""
        if self.hparams.get("mode") != "lora" or self.hparams.get("freeze_backbone") or not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "lora_adapter"
        weights = (self._backbone_meta or {}).get("weights_file")
        save_lora_adapter(self.lora_backbone(), folder, base_model=weights)

    def on_fit_start(self) -> None:
        """Take the class names from the datamodule (``classes``) when none were given; store them as
        ``class_names`` too (what ``explora-geo export --head task.ckpt`` reads)."""
        classes = getattr(getattr(self.trainer, "datamodule", None), "classes", None)
        if classes and not self.hparams.get("labels"):
            self.hparams["labels"] = list(classes)
        if self.hparams.get("labels"):
            self.hparams["class_names"] = list(self.hparams["labels"])


class ExploraClassificationTask(ExploraTaskMixin, Classification):
    """Image classification with an explora-geo backbone (see the module docstring).

    Args:
        model: a timm model name (``group_channel_vit_tiny_patch8_96``, ``vit_small_patch16_224``, or a name
            from :func:`register_backbone`). Ignored when ``weights`` is a backbone file or entry, whose
            sidecar names the architecture.
        weights: a backbone file (``.safetensors``/``.json``), a :func:`backbone_weights` entry, ``True``
            (the timm pretrained config of ``model``), ``None`` (random), or torchgeo's weights names/paths.
        in_channels: input channels; ``None`` takes the backbone's number of bands (a different number is
            an error naming the backbone's bands).
        num_classes: number of classes.
        labels: class names (stored in the checkpoint; filled from the datamodule's ``classes`` if absent).
        mode: ``full``, ``lora`` or ``linear_probe`` (see :func:`configure_finetuning`).
        lora_rank, lora_alpha: LoRA rank and scale numerator (scale ``lora_alpha / lora_rank``) for ``mode="lora"``.
        lora_targets: peft ``target_modules`` for ``mode="lora"`` (default :data:`LORA_TARGETS`: ``qkv``).
        backbone_meta: the backbone sidecar; filled in automatically and saved with the hyper-parameters.
        task, num_labels, loss, class_weights, pos_weight, ignore_index, lr, patience: as in
            ``torchgeo.tasks.Classification``.
        freeze_backbone: torchgeo's switch; ``True`` is the same as ``mode="linear_probe"``.
    """

    def __init__(
        self,
        model: str = "group_channel_vit_tiny_patch8_96",
        weights: Any = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        labels: list[str] | None = None,
        mode: Mode = "full",
        lora_rank: int = 8,
        lora_alpha: float = 1.0,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        task: Literal["binary", "multiclass", "multilabel"] = "multiclass",
        num_labels: int | None = None,
        loss: Literal["ce", "bce", "jaccard", "focal", "dice"] = "ce",
        class_weights: list[float] | None = None,
        pos_weight: Tensor | None = None,
        ignore_index: int | None = None,
        lr: float = 1e-3,
        patience: int = 10,
        freeze_backbone: bool = False,
        backbone_meta: dict[str, Any] | None = None,
    ) -> None:
        model, in_channels = self._resolve_backbone(model, weights, in_channels, num_classes, mode=mode, task=task,
                                                    backbone_meta=backbone_meta)
        super().__init__(model=model, weights=weights, in_channels=in_channels, task=task,
                         num_classes=num_classes, num_labels=num_labels, labels=labels, pos_weight=pos_weight,
                         loss=loss, class_weights=class_weights, ignore_index=ignore_index, lr=lr,
                         patience=patience, freeze_backbone=freeze_backbone)
        # The CLI passes its own view of the init args to save_hyperparameters: record what was resolved.
        self.hparams.update(model=model, in_channels=in_channels, backbone_meta=self._backbone_meta)

    def configure_models(self) -> None:
        """Build the model (checked loading of backbone files) and set the trainable parameters."""
        def timm_model() -> nn.Module:
            super(ExploraClassificationTask, self).configure_models()
            return self.model

        self.model = self._build_backbone(self._num_outputs(), timm_model)
        mode = "linear_probe" if self.hparams["freeze_backbone"] else self.hparams["mode"]
        self.model = configure_finetuning(self.model, mode, lora_rank=self.hparams["lora_rank"],
                                          lora_alpha=self.hparams["lora_alpha"],
                                          lora_targets=self.hparams["lora_targets"])

    def merged_backbone(self) -> nn.Module:
        """A plain copy of the fine-tuned backbone (LoRA merged, no classifier)."""
        model = merge_lora(self.model)
        model.reset_classifier(0)
        return model.eval()


def backbone_from_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned backbone of an :class:`ExploraClassificationTask` checkpoint and its sidecar.

    The backbone is rebuilt from the sidecar stored in the checkpoint's hyper-parameters, loaded strictly,
    with LoRA merged and the classifier removed. The returned sidecar (for
    :func:`explora_geo.checkpoint.save_backbone`) keeps bands and normalisation.

    Raises:
        ExploraGeoError: missing file, or a checkpoint without an explora-geo backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise ExploraGeoError(f"checkpoint {path} does not exist; pass the .ckpt that `torchgeo fit` wrote.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    meta = hparams.get("backbone_meta")
    if not meta:
        raise ExploraGeoError(f"{path} has no explora-geo backbone metadata (it was not trained with "
                              "explora_geo.downstream.tasks.ExploraClassificationTask and a backbone file).")
    kwargs = {k: hparams[k] for k in ("model", "num_classes", "labels", "mode", "lora_rank", "lora_alpha",
                                      "lora_targets", "loss", "lr", "patience", "in_channels") if k in hparams}
    task = ExploraClassificationTask(weights=None, backbone_meta=meta, **kwargs)
    task.load_state_dict(ckpt["state_dict"], strict=True)
    sidecar = {k: v for k, v in meta.items() if k != "weights_file"}
    return task.merged_backbone(), sidecar

"""What loading source weights did (:class:`LoadReport`) and a checkpoint as read (:class:`SourceCheckpoint`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["WEIGHTS_HINT", "LoadReport", "SourceCheckpoint", "StateDict", "jsonable"]

StateDict = dict[str, torch.Tensor]
WEIGHTS_HINT = "pass --weights PATH (a local checkpoint file) or --weights random for a smoke run"


@dataclass
class LoadReport:
    """What :func:`load_source_weights` did.

    Attributes:
        source: the spec as given, resolved (file path / timm name / torchgeo name / ``random``).
        loaded_keys: model keys whose values come from the checkpoint (possibly converted / resampled).
        new_keys: model keys left newly initialised (head, group-channel embeddings ...).
        resampled_keys: keys interpolated to the model's geometry (position grid, patch-kernel size, channels).
        ignored_keys: checkpoint keys the model has no place for (a 1000-class head, a plain ViT's pos_embed
            when loading a group-channel ViT ...).
        extra: checkpoint tensors outside the encoder, original names (MAE decoder, ``mask_token``), for the
            SSL objectives.
        notes: one line per conversion decision (RGB kernel mapping, cls/pos folding ...).
        meta: what the weights expect, when known: ``bands``, ``normalization`` (``mean``/``std``),
            ``input_size``, the sidecar of an explora-geo backbone file.
        random: ``True`` when no weights were loaded at all.
    """

    source: str
    loaded_keys: list[str] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    resampled_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    random: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``extra`` as ``{name: shape}``) for run summaries."""
        return {
            "source": self.source, "random": self.random, "loaded_keys": list(self.loaded_keys),
            "new_keys": list(self.new_keys), "resampled_keys": list(self.resampled_keys),
            "ignored_keys": list(self.ignored_keys), "extra": {k: list(v.shape) for k, v in self.extra.items()},
            "notes": list(self.notes), "meta": jsonable(self.meta),
        }

    def summary(self) -> str:
        """One short paragraph for logs and the CLI."""
        if self.random:
            return (f"RANDOM INITIALISATION: no source weights were loaded (spec {self.source!r}); "
                    "results will not reflect a pre-trained model.")
        parts = [f"Loaded {len(self.loaded_keys)} tensors from {self.source}"]
        if self.resampled_keys:
            parts.append(f"resampled {', '.join(self.resampled_keys)}")
        if self.new_keys:
            parts.append(f"newly initialised {_abbrev(self.new_keys)}")
        if self.ignored_keys:
            parts.append(f"ignored {_abbrev(self.ignored_keys)}")
        if self.extra:
            kept = _abbrev(list(self.extra))
            parts.append(f"kept {len(self.extra)} non-encoder tensors for the objective ({kept})")
        text = "; ".join(parts) + "."
        if self.notes:
            text += " " + " ".join(n.rstrip(".") + "." for n in self.notes)
        return text


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything JSON cannot hold as its ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _abbrev(keys: Sequence[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


@dataclass
class SourceCheckpoint:
    """A checkpoint as read: the raw object (a state dict or a container), where it came from, what it expects.

    ``bands`` are the source's input band names when known (torchgeo metadata, a backbone sidecar).
    """

    raw: Any
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    bands: list[str] | None = None

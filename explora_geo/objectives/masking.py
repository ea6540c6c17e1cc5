"""Token masks and the hooks that apply them inside a ViT, for timm ViTs and the group-channel ViT alike.

Token layout (both model families): ``[prefix tokens (cls, registers), group 0 patches, group 1 patches, ...]``,
``P + G * L`` tokens, where ``L = h * w`` patches per group in row-major order and ``G = 1`` for a plain ViT.
A token mask is a bool tensor ``[B, G, L]`` (True = masked); prefix tokens are never masked.

Two ways to hide masked tokens, both applied through temporary forward hooks so the backbone's own
``forward_features`` runs unchanged (no copy of its embedding code):

- :func:`replaced_tokens` (iBOT / DINOv2): masked patch embeddings are replaced by a learnable mask token
  BEFORE the position (and group) codes are added, so the model still knows where the hidden patch is;
- :func:`dropped_tokens` (MAE): only the visible tokens (with their codes) enter the transformer blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "token_grid",
    "patch_size_of",
    "img_size_of",
    "random_token_mask",
    "keep_indices",
    "replaced_tokens",
    "dropped_tokens",
]


def patch_size_of(model: nn.Module) -> int:
    """Patch side in pixels of a timm ViT (``patch_embed.patch_size``) or a group-channel ViT (``patch_size``)."""
    size = getattr(model, "patch_size", None)
    if size is None:
        size = model.patch_embed.patch_size  # type: ignore[union-attr]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def img_size_of(model: nn.Module) -> int:
    """Nominal input side in pixels of a group-channel ViT (``img_size``) or a timm ViT (``patch_embed.img_size``)."""
    size = getattr(model, "img_size", None) or model.patch_embed.img_size  # type: ignore[union-attr]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _patch_embeds(model: nn.Module) -> list[nn.Module]:
    """The patch-embedding module(s): one per channel group, or timm's single ``patch_embed``."""
    embeds = getattr(model, "patch_embeds", None)
    return list(embeds) if embeds is not None else [model.patch_embed]  # type: ignore[list-item]


def token_grid(model: nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """``(G, h, w)``: channel groups and patch-grid size for an input of ``height x width`` pixels."""
    p = patch_size_of(model)
    return len(_patch_embeds(model)), height // p, width // p


def random_token_mask(
    batch: int, groups: int, length: int, ratio: float, *, consistent: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """SatMAE-style random mask ``[B, G, L]`` (True = masked) with a fixed count of masked tokens per image.

    Args:
        batch, groups, length: B images, G channel groups, L patches per group.
        ratio: fraction of tokens masked, in ``[0, 1)``.
        consistent: mask the same spatial positions in every group (``round(ratio * L)`` positions);
            otherwise tokens are drawn independently over all ``G * L`` tokens (``round(ratio * G * L)``).
        device: where to build the mask. Uses the global torch RNG.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n = length if consistent else groups * length
    n_masked = int(round(ratio * n))
    order = torch.rand(batch, n, device=device).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :n_masked], True)
    if consistent:
        return mask[:, None, :].expand(batch, groups, length).clone()
    return mask.view(batch, groups, length)


def keep_indices(mask: Tensor) -> Tensor:
    """Indices ``[B, K]`` (into the flattened ``G * L`` patch tokens, ascending) of the visible tokens.

    Every image must have the same number K of visible tokens (true for :func:`random_token_mask`).
    """
    flat = ~mask.flatten(1)
    counts = flat.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every image must keep the same number of tokens")
    k = int(counts[0])
    # A stable sort puts the visible (True) positions first, in ascending order.
    return flat.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]


@contextlib.contextmanager
def replaced_tokens(model: nn.Module, mask: Tensor, mask_token: Tensor) -> Iterator[None]:
    """Within the block, patch embeddings where ``mask`` ([B, G, L], True = masked) is set become ``mask_token``.

    The replacement happens on the output of each group's patch embedding (``[B, L, D]``, or ``[B, h, w, D]``
    for timm's dynamic image size), i.e. before position/group codes are added.
    """
    embeds = _patch_embeds(model)
    if mask.shape[1] != len(embeds):
        raise ValueError(f"mask has {mask.shape[1]} groups, the model has {len(embeds)}")

    def make_hook(g: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, out: Tensor) -> Tensor:
            m = mask[:, g].reshape(*out.shape[:-1], 1)
            return torch.where(m, mask_token.to(out.dtype).reshape(1, -1), out)

        return hook

    handles = [e.register_forward_hook(make_hook(g)) for g, e in enumerate(embeds)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def dropped_tokens(model: nn.Module, keep: Tensor) -> Iterator[None]:
    """Within the block, only the prefix tokens and the patch tokens at ``keep`` ([B, K], indices into the
    ``G * L`` patch tokens) enter ``model.blocks``; ``forward_features`` then returns ``[B, P + K, D]``."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        patches = x[:, prefix:]
        idx = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return (torch.cat([x[:, :prefix], patches.gather(1, idx)], dim=1), *args[1:])

    handle = model.blocks[0].register_forward_pre_hook(hook)  # type: ignore[index]
    try:
        yield
    finally:
        handle.remove()


"""Fixed sine-cosine encodings (Transformer / MAE convention), pure functions of sizes and positions.

One home for the codes that both the group-channel ViT (initial position / group encodings) and the MAE
decoder (fixed position / group codes) use.
"""

from __future__ import annotations

import torch

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sine-cosine encoding (Transformer / MAE convention).

    Args:
        dim: encoding width, even.
        positions: ``[N]`` positions (any real values).

    Returns:
        ``[N, dim]`` float32: ``sin(p * w_k)`` for the first half, ``cos(p * w_k)`` for the second, with
        ``w_k = 10000 ** (-k / (dim / 2))``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos encoding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_2d(dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """2-D sine-cosine encoding of a ``H x W`` patch grid, row-major.

    Args:
        dim: encoding width, a multiple of 4 (half encodes the column, half the row).
        grid_size: ``(H, W)`` in patches.

    Returns:
        ``[H * W, dim]`` float32; token ``l = i * W + j`` gets ``concat(sincos_1d(j), sincos_1d(i))``.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos encoding width must be a multiple of 4, got {dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)

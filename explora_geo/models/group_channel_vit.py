"""Group-channel Vision Transformer (SatMAE style), timm-compatible.

Multi-spectral bands are split into groups (Sentinel-2: visible + NIR, red edge, SWIR). Each group has its
own patch embedding, so an image of ``G`` groups and ``L`` patches gives ``G * L`` tokens; every token is

    token[g, l] = patch_embed_g(x_g)[l] + concat(pos[l], group[g])

where ``pos`` is a learnable 2-D position encoding of width ``D - Dg`` (sin-cos initialised) and ``group`` a
learnable 1-D group encoding of width ``Dg`` (sin-cos initialised). ``Dg = 256`` for ``D >= 768`` (SatMAE),
else ``D // 4``. A class token (plus optional register tokens) is prepended, without position encoding.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``blocks.{i}.attn.qkv``, ``norm`` ...,
built from timm's own ``Block``), so adapters and checkpoint tools treat both alike. Layout: the
architecture class, then the checkpoint filter, then the pretrained configs, then one short registration
per variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.layers import PatchEmbed, calculate_drop_path_rates, register_notrace_function, resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models.vision_transformer import Block, global_pool_nlc, init_weights_vit_timm
from torch import nn

from explora_geo.errors import ExploraGeoError
from explora_geo.models.pos_embed import sincos_1d, sincos_2d
from explora_geo.sensors import get_sensor, select_bands

__all__ = [
    "GroupChannelViT",
    "group_embed_dim_for",
    "sincos_1d",
    "sincos_2d",
    "resolve_band_groups",
]

GlobalPool = Literal["", "token", "avg"]


# --------------------------------------------------------------------------------------------------------
# Pure functions: band groups (sin-cos encodings: explora_geo.models.pos_embed, re-exported)
# --------------------------------------------------------------------------------------------------------

def group_embed_dim_for(embed_dim: int) -> int:
    """Width ``Dg`` of the group encoding: 256 for ``D >= 768`` (SatMAE), else ``D // 4``."""
    return 256 if embed_dim >= 768 else embed_dim // 4


def resolve_band_groups(
    band_groups: Sequence[Sequence[str]] | None, sensor: str | None
) -> tuple[tuple[str, ...], ...]:
    """The band groups a model uses: ``band_groups`` if given, else the sensor preset's ``model_groups``.

    Raises:
        ExploraGeoError: for an empty group or a band listed twice.
    """
    if band_groups is None:
        groups = get_sensor(sensor or "sentinel2").model_groups
    else:
        if isinstance(band_groups, str) or any(isinstance(g, str) for g in band_groups):
            raise ExploraGeoError(
                f"band_groups must be a list of lists of band names, got {band_groups!r}; "
                'e.g. [["B02", "B03", "B04", "B08"], ["B11", "B12"]].'
            )
        groups = tuple(tuple(str(b) for b in g) for g in band_groups)
    if not groups or any(len(g) == 0 for g in groups):
        raise ExploraGeoError(f"band_groups {groups!r} has an empty group; give every group at least one band.")
    flat = [b for g in groups for b in g]
    dupes = sorted({b for b in flat if flat.count(b) > 1})
    if dupes:
        raise ExploraGeoError(f"band(s) {', '.join(dupes)} appear in more than one group; list each band once.")
    return groups


@torch.fx.wrap
@register_notrace_function
def _check_channels(x: torch.Tensor, expected: int) -> torch.Tensor:
    """``x`` unchanged if it has ``expected`` channels, else an error saying how to fix it. A leaf for FX (its
    shape test would otherwise be data-dependent control flow) and plain TorchScript."""
    if x.shape[1] != expected:
        raise ExploraGeoError(
            f"input has {x.shape[1]} channels, the model expects {expected} (its band_names); select those bands "
            "in order, or call model.select_input_bands(x, band_names) first."
        )
    return x


# --------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------

class GroupChannelViT(nn.Module):
    """SatMAE-style group-channel ViT with timm's ViT interface.

    Args:
        img_size: nominal input size (px) the position encoding is built for; other sizes (multiples of
            ``patch_size``) work by resampling the position grid (bicubic), like timm's ``dynamic_img_size``.
        patch_size: patch size (px).
        band_groups: band names per group; default: the ``sensor`` preset's ``model_groups``.
        sensor: sensor preset: its ``model_groups`` when ``band_groups`` is ``None`` (default ``"sentinel2"``),
            and its band aliases / RGB bands for weight loading. Kept as ``self.sensor`` (``None`` for custom
            ``band_groups`` without a sensor).
        in_chans: optional check: must equal the number of bands in ``band_groups``.
        num_classes: classifier outputs (0: no head, ``forward`` returns pooled features).
        global_pool: ``"token"`` (cls token), ``"avg"`` (mean of patch tokens) or ``""`` (no pooling).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values: as timm's ViT
            (``init_values`` enables LayerScale).
        group_embed_dim: width ``Dg`` of the group encoding; default :func:`group_embed_dim_for`.
        reg_tokens: number of register tokens (DINOv2 ``*_reg4`` sources), after the cls token.
        fc_norm: norm after pooling instead of before; default: ``True`` for ``"avg"`` pooling (as timm).
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout / stochastic depth.
        device, dtype: where and in which dtype to create the parameters (as timm 1.0's models;
            ``timm.create_model(..., device="meta")`` builds the structure without memory).

    Input ``x``: ``[B, C, H, W]`` with ``C = len(band_names)`` in ``band_names`` order (groups flattened).
    ``forward(x)`` takes only the tensor (TorchScript- and FX-friendly); for channels named in another order,
    or with extra bands, first call :meth:`select_input_bands`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 96,
        patch_size: int = 8,
        band_groups: Sequence[Sequence[str]] | None = None,
        sensor: str | None = None,
        in_chans: int | None = None,
        num_classes: int = 0,
        global_pool: GlobalPool = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        group_embed_dim: int | None = None,
        reg_tokens: int = 0,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("", "token", "avg"):
            raise ExploraGeoError(f"unknown global_pool {global_pool!r}; choose 'token', 'avg' or ''.")
        groups = resolve_band_groups(band_groups, sensor)
        self.band_groups: list[list[str]] = [list(g) for g in groups]
        self.band_names: list[str] = [b for g in groups for b in g]
        if in_chans is not None and in_chans != len(self.band_names):
            raise ExploraGeoError(
                f"in_chans={in_chans} does not match the {len(self.band_names)} bands of band_groups "
                f"({', '.join(self.band_names)}); drop in_chans or pass band_groups with {in_chans} bands."
            )
        self.sensor = get_sensor(sensor).name if sensor else ("sentinel2" if band_groups is None else None)
        self.in_chans = len(self.band_names)
        self.group_sizes: list[int] = [len(g) for g in groups]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.group_embed_dim = group_embed_dim if group_embed_dim is not None else group_embed_dim_for(embed_dim)
        if not 0 < self.group_embed_dim < embed_dim:
            raise ExploraGeoError(f"group_embed_dim {self.group_embed_dim} must be in (0, embed_dim={embed_dim}).")
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = 1 + reg_tokens
        self.has_class_token = True
        self.dynamic_img_size = True
        self.grad_checkpointing = False

        self.patch_embeds = nn.ModuleList(
            PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=len(g), embed_dim=embed_dim,
                       strict_img_size=False, output_fmt="NHWC", **dd)
            for g in groups
        )
        first = self.patch_embeds[0]
        self.img_size: tuple[int, int] = tuple(first.img_size)  # type: ignore[assignment]
        self.patch_size: tuple[int, int] = tuple(first.patch_size)  # type: ignore[assignment]
        self.grid_size: tuple[int, int] = tuple(first.grid_size)  # type: ignore[assignment]
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim - self.group_embed_dim, **dd))
        self.group_embed = nn.Parameter(torch.zeros(1, len(groups), self.group_embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                  init_values=init_values, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                  **dd)
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_size[0]) for i in range(depth)
        ]
        self.init_weights()

    # ---- initialisation ------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Sin-cos position / group encodings, timm ViT init for linears, small-normal prefix tokens."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
            groups = torch.arange(self.group_embed.shape[1])
            self.group_embed.copy_(sincos_1d(self.group_embed_dim, groups).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)
        for embed in self.patch_embeds:
            # MAE: initialise the patch projection like a Linear layer (xavier on the flattened kernel).
            w = embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # ---- timm helpers --------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW should not decay: encodings and prefix tokens."""
        return {"pos_embed", "group_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into stem / blocks (timm layer-decay and freezing helpers)."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|group_embed|patch_embeds",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh ``Linear(embed_dim, num_classes)`` (Identity for 0 classes)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ExploraGeoError(f"unknown global_pool {global_pool!r}; choose 'token', 'avg' or ''.")
            self.global_pool = global_pool  # type: ignore[assignment]
        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Change the nominal input size (px) and/or patch size (px), as timm's ViT does.

        The learnable position grid is resampled (bicubic) to the new grid; a new patch size resamples every
        group's kernels with timm's ``resample_patch_embed``.
        """
        old = self.grid_size
        for embed in self.patch_embeds:
            embed.set_input_size(img_size=img_size, patch_size=patch_size)
        self.img_size = tuple(self.patch_embeds[0].img_size)  # type: ignore[assignment]
        self.patch_size = tuple(self.patch_embeds[0].patch_size)  # type: ignore[assignment]
        self.grid_size = tuple(self.patch_embeds[0].grid_size)  # type: ignore[assignment]
        for info in self.feature_info:
            info["reduction"] = self.patch_size[0]
        if self.grid_size != old:
            new = resample_abs_pos_embed(self.pos_embed.data, self.grid_size, old, num_prefix_tokens=0)
            self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)

    # ---- embedding -----------------------------------------------------------------------------------
    @torch.jit.ignore
    def select_input_bands(self, x: torch.Tensor, band_names: Sequence[str] | None = None) -> torch.Tensor:
        """Reorder/select ``x``'s channels into ``self.band_names`` order, ready for :meth:`forward`.

        ``model(model.select_input_bands(x, names))`` accepts the bands in any order, with aliases (``b8a``,
        ``blue``) and extra bands; permuted bands give exactly the same output.

        Args:
            x: ``[B, C, H, W]``; with ``band_names`` its channels are named by them (any order, extra bands
                allowed), else they must already be ``self.band_names`` in order.

        Raises:
            ExploraGeoError: missing bands or a wrong channel count.
        """
        if band_names is not None:
            if len(band_names) != x.shape[1]:
                raise ExploraGeoError(
                    f"{len(band_names)} band names given for an input with {x.shape[1]} channels; "
                    "give one name per channel."
                )
            idx = select_bands(list(band_names), self.band_names, source="the input")
            if idx != list(range(len(idx))) or len(idx) != x.shape[1]:
                x = x[:, idx]
        if x.shape[1] != len(self.band_names):
            raise ExploraGeoError(
                f"input has {x.shape[1]} channels, the model expects {len(self.band_names)} "
                f"({', '.join(self.band_names)}); pass band_names=... or select those bands."
            )
        return x

    def pos_embed_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position encoding for a ``H x W`` grid: ``[1, H*W, D - Dg]`` (the parameter itself for the built grid,
        else resampled bicubically by timm's ``resample_abs_pos_embed``, which FX treats as a leaf)."""
        return resample_abs_pos_embed(self.pos_embed, [grid_size[0], grid_size[1]],
                                      [self.grid_size[0], self.grid_size[1]], num_prefix_tokens=0)

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with position and group encodings, WITHOUT prefix tokens.

        Args:
            x: ``[B, C, H, W]``, channels in ``band_names`` order (see :meth:`select_input_bands`).

        Returns:
            ``tokens [B, G * L, D]`` ordered group-major (all of group 0's ``L = h * w`` patches, then group
            1's ...), and the patch grid ``(h, w)``.
        """
        chunks = torch.split(_check_channels(x, self.in_chans), self.group_sizes, dim=1)
        per_group: list[torch.Tensor] = []
        grid: tuple[int, int] = (self.grid_size[0], self.grid_size[1])
        for g, embed in enumerate(self.patch_embeds):
            y = embed(chunks[g])  # [B, h, w, D]
            grid = (y.shape[1], y.shape[2])
            per_group.append(y.reshape(y.shape[0], -1, y.shape[-1]))
        pos = self.pos_embed_for(grid)  # [1, L, D - Dg]
        tokens: list[torch.Tensor] = []
        for g, y in enumerate(per_group):
            code = self.group_embed[:, g:g + 1].expand(-1, pos.shape[1], -1)  # [1, L, Dg]
            tokens.append(y + torch.cat([pos, code], dim=-1))
        return torch.cat(tokens, dim=1), grid

    def add_prefix_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend cls (and register) tokens: ``[B, N, D] -> [B, num_prefix_tokens + N, D]``."""
        parts = [self.cls_token.expand(tokens.shape[0], -1, -1)]
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(tokens.shape[0], -1, -1))
        parts.append(tokens)
        return torch.cat(parts, dim=1)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.embed_tokens(x)
        return self.pos_drop(self.add_prefix_tokens(tokens)), grid

    # ---- forward -------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, num_prefix_tokens + G * L, D]`` (final norm applied)."""
        x, _ = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """``[B, N, D] -> [B, D]`` by the cls token (``token``) or patch-token mean (``avg``); ``''``: as is."""
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, N, D]`` -> logits ``[B, num_classes]`` (or pooled features with ``pre_logits``)."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> logits ``[B, num_classes]`` (pooled features ``[B, D]`` when no head)."""
        return self.forward_head(self.forward_features(x))

    # ---- intermediate features -----------------------------------------------------------------------
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        group_reduce: Literal["mean", "concat"] = "mean",
    ) -> Any:
        """Features of selected blocks (timm's signature).

        Args:
            indices: last ``n`` blocks if an int, all if ``None``, else the given block indices.
            norm: apply the final norm to each intermediate.
            output_fmt: ``"NLC"``: ``[B, G * L, D]`` patch tokens; ``"NCHW"``: each group's tokens as a
                ``[B, D, h, w]`` grid, then averaged over groups (``group_reduce="mean"``, default, keeps
                ``D`` channels for dense heads) or concatenated (``"concat"``: ``[B, G * D, h, w]``).
            return_prefix_tokens: also return the prefix tokens ``[B, num_prefix_tokens, D]`` per block.

        Returns:
            ``(final_features [B, N, D], intermediates)``, only ``intermediates``, or a dict with
            ``image_features`` / ``image_intermediates`` (/ ``image_intermediates_prefix``), as timm.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ExploraGeoError(f"output_fmt {output_fmt!r} is not supported; use 'NCHW' or 'NLC'.")
        if group_reduce not in ("mean", "concat"):
            raise ExploraGeoError(f"group_reduce {group_reduce!r} is not supported; use 'mean' or 'concat'.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (h, w) = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        n_pre = self.num_prefix_tokens
        prefix_tokens = [y[:, :n_pre] for y in intermediates]
        intermediates = [y[:, n_pre:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [self._tokens_to_grid(y, (h, w), group_reduce) for y in intermediates]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def _tokens_to_grid(self, y: torch.Tensor, grid: tuple[int, int], group_reduce: str) -> torch.Tensor:
        """``[B, G * h * w, D] -> [B, D, h, w]`` (mean over groups) or ``[B, G * D, h, w]`` (concat)."""
        b, _, d = y.shape
        g = len(self.band_groups)
        y = y.reshape(b, g, grid[0], grid[1], d).permute(0, 1, 4, 2, 3)  # [B, G, D, h, w]
        if group_reduce == "mean":
            return y.mean(dim=1).contiguous()
        return y.reshape(b, g * d, grid[0], grid[1]).contiguous()

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop blocks after the last wanted index (and optionally the norm / head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] | tuple[int, ...] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
    ) -> list[Any]:
        """DINO-style interface: outputs of the last ``n`` blocks (or the listed ones)."""
        return self.forward_intermediates(
            x, list(n) if isinstance(n, tuple) else n, return_prefix_tokens=return_prefix_tokens, norm=norm,
            output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
        )


# --------------------------------------------------------------------------------------------------------
# Checkpoint filter (timm ``pretrained_cfg`` loading of our own files)
# --------------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: GroupChannelViT) -> dict[str, torch.Tensor]:
    """Adapt a group-channel state dict to ``model``: unwrap ``model``/``state_dict`` containers and resample
    ``pos_embed`` ``[1, L', D - Dg]`` to the model's grid (square source grid assumed)."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]  # type: ignore[assignment]
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape[1] != model.pos_embed.shape[1]:
        side = int(math.isqrt(pos.shape[1]))
        out["pos_embed"] = resample_abs_pos_embed(pos, list(model.grid_size), [side, side], num_prefix_tokens=0)
    return out


# --------------------------------------------------------------------------------------------------------
# Pretrained configs and registrations
# --------------------------------------------------------------------------------------------------------

def _cfg(img_size: int, **kwargs: Any) -> dict[str, Any]:
    """timm's pretrained-cfg fields for the default (Sentinel-2, 3 groups) variant. ``first_conv`` names every
    group's patch projection (timm adapts each when a checkpoint's channel count differs); ``.untrained`` is
    timm's tag for a variant without released weights (point ``file`` at your own)."""
    groups = get_sensor("sentinel2").model_groups
    n_bands = sum(len(g) for g in groups)
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (n_bands, img_size, img_size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        # explora-geo scales inputs itself (explora_geo.normalization); timm's transforms should not.
        "mean": (0.0,) * n_bands,
        "std": (1.0,) * n_bands,
        "first_conv": tuple(f"patch_embeds.{g}.proj" for g in range(len(groups))),
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2207.08051",
        "paper_name": "SatMAE: Pre-training Transformers for Temporal and Multi-Spectral Satellite Imagery",
        **kwargs,
    }


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_GEOMETRIES = {"patch8_96": dict(patch_size=8, img_size=96), "patch16_224": dict(patch_size=16, img_size=224)}

default_cfgs = generate_default_cfgs({
    f"group_channel_vit_{size}_{geom}.untrained": _cfg(g["img_size"])
    for size in _SIZES for geom, g in _GEOMETRIES.items()
})


def _create_group_channel_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    # timm fills in_chans from the pretrained cfg when absent: derive it from the bands instead, so that
    # only an explicit, inconsistent in_chans is an error.
    groups = resolve_band_groups(kwargs.get("band_groups"), kwargs.get("sensor"))
    kwargs.setdefault("in_chans", sum(len(g) for g in groups))
    return build_model_with_cfg(
        GroupChannelViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _variant(size: str, geometry: str, pretrained: bool, **kwargs: Any) -> GroupChannelViT:
    args = {**_SIZES[size], **_GEOMETRIES[geometry], **kwargs}
    return _create_group_channel_vit(f"group_channel_vit_{size}_{geometry}", pretrained=pretrained, **args)


@register_model
def group_channel_vit_tiny_patch8_96(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-Ti/8 at 96 px (D=192, 12 blocks, 3 heads; SatMAE geometry)."""
    return _variant("tiny", "patch8_96", pretrained, **kwargs)


@register_model
def group_channel_vit_small_patch8_96(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-S/8 at 96 px (D=384, 12 blocks, 6 heads; SatMAE geometry)."""
    return _variant("small", "patch8_96", pretrained, **kwargs)


@register_model
def group_channel_vit_base_patch8_96(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-B/8 at 96 px (D=768, 12 blocks, 12 heads; SatMAE geometry)."""
    return _variant("base", "patch8_96", pretrained, **kwargs)


@register_model
def group_channel_vit_large_patch8_96(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-L/8 at 96 px (D=1024, 24 blocks, 16 heads; SatMAE's fMoW-Sentinel model)."""
    return _variant("large", "patch8_96", pretrained, **kwargs)


@register_model
def group_channel_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-Ti/16 at 224 px (D=192, 12 blocks, 3 heads)."""
    return _variant("tiny", "patch16_224", pretrained, **kwargs)


@register_model
def group_channel_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-S/16 at 224 px (D=384, 12 blocks, 6 heads)."""
    return _variant("small", "patch16_224", pretrained, **kwargs)


@register_model
def group_channel_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-B/16 at 224 px (D=768, 12 blocks, 12 heads)."""
    return _variant("base", "patch16_224", pretrained, **kwargs)


@register_model
def group_channel_vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT-L/16 at 224 px (D=1024, 24 blocks, 16 heads)."""
    return _variant("large", "patch16_224", pretrained, **kwargs)

"""The ExPLoRA adapter: which parameters of a ViT train during extended pre-training, and how to merge.

ExPLoRA (Khanna et al., "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers
under Domain Shifts", ICML 2025) continues the self-supervised pre-training of a ViT on a new domain while
training only:

- a few blocks, fully unfrozen (paper notation ``[L]`` = the last block, ``[1,L]`` = first and last);
- LoRA of rank ``r`` on the **Q and V** projections of every other (frozen) block;
- every normalisation layer, the cls token (and register tokens), and for multi-spectral group-channel ViTs
  the new patch embeddings, position and group encodings.

Works on any timm-style ViT: ``model.blocks[i].attn.qkv`` (one fused ``nn.Linear``, rows ordered Q, K, V),
``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, norm layers anywhere. That covers timm's ``VisionTransformer`` and
explora-geo's ``GroupChannelViT``.

The API mirrors peft: a config dataclass (:class:`ExploraConfig`) and an apply/merge pair
(:func:`apply_explora`, :func:`merge_explora`). LoRA lives in :class:`LoRALinear`, an ``nn.Linear`` subclass
that keeps the frozen ``weight``/``bias`` under their original names and adds a low-rank update to chosen
*row segments* of its output (the Q rows and the V rows of the fused ``qkv``), so the frozen K rows never
change and merging gives back a plain fused ``qkv``. Why not peft itself: peft's LoRA on ``qkv`` adapts all
three projections at once (not the method), and splitting ``qkv`` into three Linear layers would change
timm's attention forward; a small module with one fused autograd function is cleaner and faster.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from explora_geo.errors import ExploraGeoError

__all__ = [
    "ExploraConfig",
    "LoRALinear",
    "resolve_unfreeze",
    "apply_explora",
    "merge_explora",
    "merged_state_dict",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "count_parameters",
    "CATEGORIES",
]

#: LoRA targets: rows of the fused ``attn.qkv`` (``q``, ``k``, ``v``) or whole Linear layers.
TARGETS: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")
_QKV_ROWS = {"q": 0, "k": 1, "v": 2}
_LINEAR_PATHS = {"proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
#: Parameter names (first component) that count as embeddings.
_EMBEDDING_NAMES = ("cls_token", "reg_token", "pos_embed", "group_embed", "patch_embed", "patch_embeds")
_PREFIX_TOKENS = ("cls_token", "reg_token")
_GROUP_EMBEDDINGS = ("patch_embed", "patch_embeds", "pos_embed", "group_embed")
#: Categories of :func:`count_parameters`, in display order.
CATEGORIES: tuple[str, ...] = ("blocks_unfrozen", "blocks_frozen", "lora", "norms", "embeddings", "other")


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------

@dataclass
class ExploraConfig:
    """What trains during ExPLoRA extended pre-training.

    Args:
        unfreeze: blocks to unfreeze fully. A string in the paper's 1-based notation resolved against the
            model depth ``L``: ``"L"`` (last block), ``"1,L"``, ``"1,L-1,L"``, ``"L-1"``, ``"3"``; brackets
            are allowed (``"[1,L]"``); ``""`` or ``"none"`` unfreezes nothing. Or a sequence of explicit
            **0-based** block indices, e.g. ``(0, 23)``. See :func:`resolve_unfreeze`.
        rank: LoRA rank ``r`` on the frozen blocks; 0 disables LoRA.
        alpha: LoRA scale numerator: the update is ``(alpha / r) * B @ A``. The default 1.0 gives a scale of
            ``1/r``, as in the paper's public code (peft's ``lora_alpha=1``).
        targets: LoRA targets in every frozen block: ``"q"``, ``"k"``, ``"v"`` (rows of the fused ``qkv``),
            ``"proj"``, ``"fc1"``, ``"fc2"``. The method is ``("q", "v")``; the others exist for ablations.
        train_norms: train every normalisation layer (in every block, the final ``norm``, ``fc_norm``).
        train_cls_token: train the cls token and the register tokens (``reg_token``) if the model has them.
        train_embeddings: train the patch embedding(s) and position (and group) encodings. ``None`` means
            "yes for group-channel ViTs" (their per-group embeddings are new), no for RGB ViTs.
        dropout: dropout probability on the LoRA input (0 = none).
    """

    unfreeze: str | Sequence[int] = "L"
    rank: int = 64
    alpha: float = 1.0
    targets: Sequence[str] = ("q", "v")
    train_norms: bool = True
    train_cls_token: bool = True
    train_embeddings: bool | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ExploraGeoError(f"LoRA rank must be an integer >= 0 (0 = no LoRA), got {self.rank!r}.")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ExploraGeoError(f"LoRA alpha must be a positive number, got {self.alpha!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ExploraGeoError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in re.split(r"[\s,]+", self.targets) if t)
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ExploraGeoError(
                f"unknown LoRA target(s) {', '.join(map(repr, bad))}; choose from {', '.join(TARGETS)}."
            )
        if not isinstance(self.unfreeze, str):
            self.unfreeze = tuple(self.unfreeze)
        # Validate the syntax now; the depth is checked when the config is applied to a model.
        resolve_unfreeze(self.unfreeze, depth=None)

    @property
    def scale(self) -> float:
        """LoRA scale ``alpha / rank`` (0 when ``rank == 0``)."""
        return self.alpha / self.rank if self.rank else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExploraConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ExploraGeoError(f"ExPLoRA config has unknown keys {sorted(unknown)}; expected {sorted(known)}.")
        kwargs = dict(data)
        for key in ("unfreeze", "targets"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict())


_TOKEN = re.compile(r"^(?:(\d+)|L(?:\s*-\s*(\d+))?)$")


def resolve_unfreeze(spec: str | Sequence[int], depth: int | None) -> tuple[int, ...]:
    """0-based indices of the blocks to unfreeze, sorted and unique.

    Args:
        spec: a string in 1-based paper notation, ``L`` standing for the depth: ``"L"``, ``"1,L"``,
            ``"1,L-1,L"``, ``"[L-1, L]"``, ``"2"``; ``""``/``"none"`` for no block. Or a sequence of 0-based
            integers (explicit indices). ``"1,L"`` with depth 24 gives ``(0, 23)``; with depth 12 ``(0, 11)``.
        depth: number of blocks of the model. ``None`` only checks the syntax (returns ``()``).

    Raises:
        ExploraGeoError: malformed spec, or an index outside the model's ``depth`` blocks (names both).
    """
    if isinstance(spec, str):
        body = spec.strip().strip("[]()").strip()
        if body.lower() in ("", "none"):
            return ()
        indices: list[int] = []
        for token in (t.strip() for t in body.split(",")):
            match = _TOKEN.match(token)
            if match is None:
                raise ExploraGeoError(
                    f"malformed --unfreeze item {token!r} in {spec!r}; use 1-based block numbers and L, "
                    "e.g. 'L', '1,L' or '1,L-1,L'."
                )
            if depth is None:
                continue
            number, minus = match.groups()
            one_based = int(number) if number is not None else depth - int(minus or 0)
            if not 1 <= one_based <= depth:
                raise ExploraGeoError(
                    f"--unfreeze item {token!r} is block {one_based} but the model has depth {depth} "
                    f"(blocks 1..{depth}, 1-based); use an item within 1..L."
                )
            indices.append(one_based - 1)
        return tuple(sorted(set(indices)))
    indices = []
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 0:
            raise ExploraGeoError(
                f"unfreeze indices must be 0-based integers >= 0, got {item!r} in {list(spec)!r}."
            )
        item = int(item)
        if depth is not None and item >= depth:
            raise ExploraGeoError(
                f"unfreeze block index {item} (0-based) is outside the model's depth {depth} "
                f"(valid 0..{depth - 1}); use an index below {depth}."
            )
        indices.append(item)
    return tuple(sorted(set(indices))) if depth is not None else ()


# --------------------------------------------------------------------------------------------------------
# LoRA on row segments of a Linear layer
# --------------------------------------------------------------------------------------------------------

class _RowLoRAFunction(torch.autograd.Function):
    """``y = x W^T + b`` plus ``scale * (x_l A_s^T) B_s^T`` added to the rows of each segment ``s``.

    A hand-written backward keeps the cost at the minimum: no merged weight, no copy of the ``[N, out]``
    output for in-place slices, no weight gradient for the frozen ``W``. Saved for backward: ``x`` (only if
    ``W`` trains), ``x_l`` (the LoRA input, ``[N, in]``) and ``h = scale * x_l A^T`` (``[N, r * S]``).
    Shapes: ``x``, ``x_l``: ``[..., in]``; ``A``: ``[r * S, in]`` (the segments' ``A_s`` stacked);
    ``B_s``: ``[stop_s - start_s, r]``.

    The backward is ``once_differentiable``: it is not itself differentiable, so a double backward
    (``create_graph=True``, gradient penalties, Hessian-vector products) raises instead of silently
    giving wrong second derivatives.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_x: torch.Tensor, same_input: bool, weight: torch.Tensor,
                bias: torch.Tensor | None, a: torch.Tensor, scale: float,
                segments: tuple[tuple[int, int], ...], *bs: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        lx2 = x2 if same_input else lora_x.reshape(-1, lora_x.shape[-1])
        h = (lx2 @ a.t()).mul_(scale)  # autocast may make out and h lower precision than the parameters
        rank = a.shape[0] // len(segments)
        for i, ((start, stop), b) in enumerate(zip(segments, bs, strict=True)):
            out[:, start:stop].addmm_(h[:, i * rank:(i + 1) * rank].to(out.dtype), b.t().to(out.dtype))
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.same_input, ctx.scale, ctx.segments, ctx.rank = same_input, scale, segments, rank
        ctx.in_shape, ctx.has_bias = x.shape, bias is not None
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, lx2, weight, a, h, *bs)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, lx2, weight, a, h, *bs = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # same precision as the forward
            g = grad.reshape(-1, grad.shape[-1])
            r = ctx.rank
            g_segs = [g[:, start:stop] for start, stop in ctx.segments]
            grad_bs = [gs.t() @ h[:, i * r:(i + 1) * r] for i, gs in enumerate(g_segs)]
            grad_h = torch.cat([gs @ b for gs, b in zip(g_segs, bs, strict=True)], dim=1).mul_(ctx.scale)
            grad_a = grad_h.t() @ lx2 if ctx.needs_input_grad[5] else None
            grad_x = grad_lx = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ weight
                if ctx.same_input:
                    grad_x.addmm_(grad_h.to(grad_x.dtype), a.to(grad_x.dtype))
                grad_x = grad_x.reshape(ctx.in_shape)
            if ctx.needs_input_grad[1] and not ctx.same_input:
                grad_lx = (grad_h @ a).reshape(ctx.in_shape)
            grad_w = g.t() @ x2 if ctx.needs_input_grad[3] else None
            grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (grad_x, grad_lx, None, grad_w, grad_bias, grad_a, None, None, *grad_bs)


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus low-rank updates on chosen row segments of its output.

    ``y = x W^T + b``, then for each segment ``s = [start, stop)``:
    ``y[..., start:stop] += scale * (dropout(x) A_s^T) B_s^T`` with ``A_s: [r, in]``, ``B_s: [stop-start, r]``.
    On a fused ``qkv`` (``out = 3 * D``) the segments ``q = [0, D)`` and ``v = [2D, 3D)`` adapt Q and V and
    leave K exactly as it was. ``weight`` and ``bias`` keep their names (``...qkv.weight``), the LoRA tensors
    are ``...qkv.lora_A.<seg>`` and ``...qkv.lora_B.<seg>``.

    Cost: one ``[N, in] x [in, r * S]`` matmul for all S segments together, then one thin
    ``[N, r] x [r, stop-start]`` matmul per segment accumulated into the output rows, in a fused autograd
    function with a hand-written backward (:class:`_RowLoRAFunction`): the merged weight is never
    materialised and the frozen weight gets no weight gradient. The update is never
    merged implicitly (``.eval()`` changes nothing): merge with :meth:`merged_weight` / :func:`merge_explora`.

    Args:
        base: the Linear to adapt (its parameters are reused, not copied, and frozen).
        segments: segment name -> ``(start, stop)`` output rows.
        rank: ``r`` (> 0).
        scale: multiplier of the update (``alpha / r``).
        dropout: dropout probability on ``x`` before ``A``.
    """

    def __init__(
        self,
        base: nn.Linear,
        segments: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scale: float,
        dropout: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.segments = {name: (int(start), int(stop)) for name, (start, stop) in segments.items()}
        self.rank, self.scale = rank, scale
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(rank, self.in_features, **dd)) for name in self.segments}
        )
        self.lora_B = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(stop - start, rank, **dd))
             for name, (start, stop) in self.segments.items()}
        )
        for a in self.lora_A.values():
            # peft's default init: A Kaiming-uniform, B zero, so the update starts at exactly 0.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features]`` -> ``[..., out_features]``."""
        names = list(self.segments)
        a = self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[n] for n in names])
        lora_x = self.lora_dropout(x)
        return _RowLoRAFunction.apply(x, lora_x, lora_x is x, self.weight, self.bias, a, self.scale,
                                      tuple(self.segments.values()), *(self.lora_B[n] for n in names))

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update ``[out_features, in_features]`` (zeros outside the segments)."""
        delta = torch.zeros_like(self.weight)
        for name, (start, stop) in self.segments.items():
            delta[start:stop] = self.scale * (self.lora_B[name] @ self.lora_A[name])
        return delta

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + delta`` as a new tensor; the module is not changed."""
        return self.weight + self.delta_weight()

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight (and a copy of the bias)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.merged_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        segs = ", ".join(f"{n}=[{a}:{b}]" for n, (a, b) in self.segments.items())
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, {segs}"


# --------------------------------------------------------------------------------------------------------
# Apply / merge
# --------------------------------------------------------------------------------------------------------

def _is_group_channel(model: nn.Module) -> bool:
    """Whether ``model`` is a multi-spectral group-channel ViT (it has ``patch_embeds`` or ``group_embed``)."""
    return hasattr(model, "patch_embeds") or hasattr(model, "group_embed")


def _blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0 or not all(
        isinstance(getattr(getattr(b, "attn", None), "qkv", None), nn.Linear) for b in blocks
    ):
        raise ExploraGeoError(
            f"{type(model).__name__} is not a timm-style ViT (needs blocks[i].attn.qkv as one Linear); "
            "use a timm VisionTransformer or an explora-geo group-channel ViT."
        )
    return blocks


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
    return isinstance(module, norm_types) or type(module).__name__.endswith(("Norm", "Norm2d"))


def _target_segments(layer: nn.Linear, target: str) -> dict[str, tuple[int, int]]:
    if target in _QKV_ROWS:
        width = layer.out_features // 3
        i = _QKV_ROWS[target]
        return {target: (i * width, (i + 1) * width)}
    return {target: (0, layer.out_features)}


def _add_lora(block: nn.Module, config: ExploraConfig) -> None:
    """Replace the targeted Linear layers of one frozen block with :class:`LoRALinear`."""
    by_path: dict[str, dict[str, tuple[int, int]]] = {}
    for target in config.targets:
        path = "attn.qkv" if target in _QKV_ROWS else _LINEAR_PATHS[target]
        by_path.setdefault(path, {})
        layer = block.get_submodule(path)
        by_path[path].update(_target_segments(layer, target))
    for path, segments in by_path.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = block.get_submodule(parent_path)
        layer = getattr(parent, leaf)
        # Keep the Q, K, V row order whatever order the targets were given in.
        ordered = dict(sorted(segments.items(), key=lambda kv: kv[1][0]))
        setattr(parent, leaf, LoRALinear(layer, ordered, rank=config.rank, scale=config.scale,
                                         dropout=config.dropout))


def apply_explora(model: nn.Module, config: ExploraConfig | None = None) -> nn.Module:
    """Prepare ``model`` for ExPLoRA training, in place, and return it.

    Freezes every parameter, then unfreezes (``requires_grad=True``): the blocks of ``config.unfreeze``
    completely; every normalisation layer (``train_norms``); ``cls_token`` and ``reg_token``
    (``train_cls_token``); the patch embedding(s), ``pos_embed`` and ``group_embed`` (``train_embeddings``,
    default: only for group-channel ViTs). Every other block gets :class:`LoRALinear` of rank
    ``config.rank`` on ``config.targets`` (Q and V rows of ``attn.qkv`` by default), with ``B = 0`` so the
    output is unchanged until training moves it. The classification head, if any, stays frozen (train
    task heads yourself). The resolved config is stored as ``model.explora_config``.

    Raises:
        ExploraGeoError: the model is not a timm-style ViT, it already has LoRA, or the unfreeze spec does
            not fit its depth.
    """
    config = config or ExploraConfig()
    blocks = _blocks(model)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ExploraGeoError("this model already has ExPLoRA LoRA layers; apply_explora to a fresh model.")
    unfrozen = resolve_unfreeze(config.unfreeze, len(blocks))
    model.requires_grad_(False)
    for i, block in enumerate(blocks):
        if i in unfrozen:
            block.requires_grad_(True)
        elif config.rank > 0 and config.targets:
            _add_lora(block, config)
    if config.train_norms:
        for module in model.modules():
            if _is_norm(module):
                module.requires_grad_(True)
    train_embeddings = _is_group_channel(model) if config.train_embeddings is None else config.train_embeddings
    trainable_roots = (_PREFIX_TOKENS if config.train_cls_token else ()) + (
        _GROUP_EMBEDDINGS if train_embeddings else ()
    )
    for name, param in model.named_parameters():
        if name.split(".")[0] in trainable_roots:
            param.requires_grad_(True)
    model.explora_config = config
    return model


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vanilla-architecture state dict of an adapted ``model``: LoRA merged, no LoRA keys.

    ``model`` is not changed. The result loads with ``strict=True`` into the architecture ``model`` was
    built as (before :func:`apply_explora`). Tensors are detached; frozen ones are shared, not copied.
    """
    state = {k: v.detach() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in _lora_modules(model):
        state[f"{name}.weight"] = module.merged_weight().detach()
    return state


def merge_explora(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model (fused ``qkv``, no LoRA modules) computing what the adapted ``model`` computes.

    Each :class:`LoRALinear` becomes an ``nn.Linear`` with ``W + (alpha/r) B A``; all parameters get
    ``requires_grad=True`` again (a vanilla model) and ``explora_config`` is removed. The input ``model``
    is left untouched unless ``inplace=True``.
    """
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(_lora_modules(target)):
        parent_name, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(parent_name) if parent_name else target, leaf, module.to_linear())
    target.requires_grad_(True)
    if hasattr(target, "explora_config"):
        del target.explora_config
    return target


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what ExPLoRA trained: every parameter with ``requires_grad`` (LoRA, unfrozen blocks, norms,
    tokens, embeddings), detached. With the source weights and the config, this rebuilds the adapted
    model (:func:`load_adapter_state_dict`)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "the adapter"
) -> None:
    """Load :func:`adapter_state_dict` output into a model prepared with the same config.

    Every trainable parameter of ``model`` must be in ``state`` and every key of ``state`` must be a
    trainable parameter with the same shape.

    Raises:
        ExploraGeoError: naming missing, unexpected or mis-shaped keys and ``source``.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    shapes = sorted(k for k in set(params) & set(state) if tuple(params[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{label} {_few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise ExploraGeoError(
            f"{source} does not match this model ({'; '.join(parts)}); load it into a model built with the "
            "same architecture and ExPLoRA config."
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _few(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


# --------------------------------------------------------------------------------------------------------
# Parameter accounting
# --------------------------------------------------------------------------------------------------------

def _category(name: str, module: nn.Module, unfrozen_blocks: set[int]) -> str:
    parts = name.split(".")
    if ".lora_" in name:
        return "lora"
    if parts[0] == "blocks" and int(parts[1]) in unfrozen_blocks:
        return "blocks_unfrozen"
    if _is_norm(module):
        return "norms"
    if parts[0] in _EMBEDDING_NAMES:
        return "embeddings"
    if parts[0] == "blocks":
        return "blocks_frozen"
    return "other"


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts, overall and by category.

    Categories (:data:`CATEGORIES`): ``blocks_unfrozen`` (blocks whose parameters all train, norms
    included), ``blocks_frozen`` (the frozen weights of the other blocks), ``lora``, ``norms`` (outside
    unfrozen blocks), ``embeddings`` (cls/register tokens, position/group encodings, patch embeddings),
    ``other`` (heads, ...).

    Returns:
        ``{"trainable": int, "total": int, "by_category": {category: {"trainable": int, "total": int}}}``.
    """
    owner = {f"{m}.{p}" if m else p: mod for m, mod in model.named_modules() for p, _ in
             mod.named_parameters(recurse=False)}
    unfrozen: set[int] = set()
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        unfrozen = {i for i, b in enumerate(blocks)
                    if not any(isinstance(m, LoRALinear) for m in b.modules())
                    and all(p.requires_grad for p in b.parameters())}
    by_category = {c: {"trainable": 0, "total": 0} for c in CATEGORIES}
    for name, param in model.named_parameters():
        entry = by_category[_category(name, owner[name], unfrozen)]
        entry["total"] += param.numel()
        if param.requires_grad:
            entry["trainable"] += param.numel()
    return {
        "trainable": sum(e["trainable"] for e in by_category.values()),
        "total": sum(e["total"] for e in by_category.values()),
        "by_category": by_category,
    }

"""``explora-geo describe``: what ExPLoRA would train on a model, without building weights or downloading."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``describe`` sub-command."""
    parser = subparsers.add_parser(
        "describe",
        help="count the parameters ExPLoRA trains on a model (offline, no weights)",
        description="Build the architecture only (on PyTorch's meta device: no memory, no download), apply "
                    "ExPLoRA and print trainable / total parameters by category: unfrozen blocks, the frozen "
                    "blocks' weights, LoRA, norms, embeddings (cls/register tokens, position/group encodings, "
                    "patch embeddings) and other (heads).",
    )
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="timm model name (vit_large_patch14_dinov2, group_channel_vit_large_patch8_96, ...)")
    parser.add_argument("--bands", metavar="SENSOR", default=None,
                        help="sensor preset (sentinel2, landsat8, naip, rgb, ...): a group-channel model uses its "
                             "groups, a plain ViT its number of bands (default: the model's own input)")
    parser.add_argument("--unfreeze", default="L", metavar="SPEC",
                        help="blocks to unfreeze, 1-based with L = depth: L, 1,L, 1,L-1,L, none (default: L)")
    parser.add_argument("--rank", type=int, default=64,
                        help="LoRA rank on the frozen blocks, 0 = none (default 64)")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="LoRA alpha; the update is scaled by alpha/rank (default 1.0, i.e. 1/rank)")
    parser.add_argument("--targets", default="q,v", metavar="LIST",
                        help="LoRA targets, comma-separated from q,k,v,proj,fc1,fc2 (default: q,v)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def describe(model_name: str, bands: str | None, config: Any) -> dict[str, Any]:
    """Build ``model_name`` on the meta device, apply ``config`` and return the description dict.

    Returns:
        ``{"model", "bands", "depth", "embed_dim", "unfrozen_blocks" (0-based), "explora" (config dict),
        "trainable_params", "total_params", "trainable_percent", "by_category"}``.
    """
    import torch

    from explora_geo.adapter import apply_explora, count_parameters, resolve_unfreeze
    from explora_geo.models import create_backbone

    with torch.device("meta"):
        model = create_backbone(model_name, bands=bands)
    depth = len(getattr(model, "blocks", ()))
    apply_explora(model, config)
    counts = count_parameters(model)
    return {
        "model": model_name,
        "bands": list(getattr(model, "band_names", None) or []),
        "depth": depth,
        "embed_dim": int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0)),
        "unfrozen_blocks": list(resolve_unfreeze(config.unfreeze, depth)),
        "explora": config.to_dict(),
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_percent": round(100.0 * counts["trainable"] / max(counts["total"], 1), 3),
        "by_category": counts["by_category"],
    }


def format_table(info: dict[str, Any]) -> str:
    """A readable text table of :func:`describe`'s result."""
    cfg = info["explora"]
    blocks = ", ".join(str(i + 1) for i in info["unfrozen_blocks"]) or "none"
    lora = (f"LoRA r={cfg['rank']} alpha={cfg['alpha']:g} (scale {cfg['alpha'] / cfg['rank']:.4g}) on "
            f"{','.join(cfg['targets'])} of the other blocks") if cfg["rank"] else "no LoRA"
    lines = [
        f"model     {info['model']}  (depth {info['depth']}, width {info['embed_dim']})",
        f"bands     {', '.join(info['bands']) or 'model default'}",
        f"ExPLoRA   unfreeze {cfg['unfreeze']!s} -> block(s) {blocks} of {info['depth']} (1-based); {lora}",
        "",
        f"{'category':<18}{'trainable':>14}{'total':>16}",
    ]
    for name, entry in info["by_category"].items():
        lines.append(f"{name:<18}{entry['trainable']:>14,}{entry['total']:>16,}")
    lines.append(f"{'total':<18}{info['trainable_params']:>14,}{info['total_params']:>16,}")
    lines.append(f"trainable: {info['trainable_params'] / 1e6:.2f}M of {info['total_params'] / 1e6:.2f}M "
                 f"({info['trainable_percent']:.2f}%)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Describe the model and print a table (or one JSON object with ``--json``)."""
    from explora_geo.adapter import ExploraConfig

    config = ExploraConfig(unfreeze=args.unfreeze, rank=args.rank, alpha=args.alpha, targets=args.targets)
    info = describe(args.model, args.bands, config)
    print(json.dumps(info) if args.json else format_table(info))
    return 0

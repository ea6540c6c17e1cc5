"""``explora-geo probe``: the paper's linear-probe protocol (+ kNN) of a frozen backbone on labelled chips."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from explora_geo.errors import ExploraGeoError


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated fractions, e.g. 0.6,0.2,0.2")
    return parts  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``probe`` sub-command."""
    parser = subparsers.add_parser(
        "probe",
        help="linear probe + kNN of a frozen backbone on a folder of labelled chips",
        description="Extract frozen features (cls token of the last 1 or 4 blocks, with or without the mean "
                    "patch token), train a grid of linear heads (lr 1e-4..0.1, SGD momentum 0.9, no weight "
                    "decay, cosine), choose the head on the validation split and report it on the test split; "
                    "also a weighted kNN (k in 10, 20, 100, 200, T=0.07). Prints one JSON line; writes "
                    "probe.json, confusion_matrix.png and the chosen head (head.safetensors + head.json).",
    )
    parser.add_argument("--backbone", required=True, metavar="FILE",
                        help="backbone file (<name>.safetensors/.json) or a `torchgeo fit` checkpoint (.ckpt) "
                             "of explora_geo.downstream.tasks.ExploraClassificationTask")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="chip folder: one sub-folder of GeoTIFF chips per class (EuroSAT layout)")
    parser.add_argument("--bands", "--file-bands", dest="file_bands", default=None, metavar="SENSOR",
                        help="band names of the files, in file order, when they have no band descriptions: "
                             "'eurosat' (B8A last), a sensor preset ('sentinel2', 'sentinel2_l2a', ...) or "
                             "a comma-separated list (default: the GeoTIFF band descriptions)")
    parser.add_argument("--out", default="runs/probe", metavar="DIR", help="output folder (default: runs/probe)")
    parser.add_argument("--split", type=_fractions, default=(0.6, 0.2, 0.2), metavar="TR,VA,TE",
                        help="train,val,test fractions, stratified per class (default: 0.6,0.2,0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split and head seed (default: 0)")
    parser.add_argument("--epochs", type=int, default=100, help="linear-head epochs (default: 100)")
    parser.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size (default: 64)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto, cpu, cuda, cuda:1 ... (default: auto)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the probe and print one JSON line (top1, knn_top1, per-class accuracy, chosen head)."""
    import torch

    from explora_geo.checkpoint import load_backbone, save_backbone
    from explora_geo.downstream.probe import probe_backbone

    if args.epochs < 1 or args.batch_size < 1:
        raise ExploraGeoError("--epochs and --batch-size must be positive.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    if Path(args.backbone).suffix == ".ckpt":
        from explora_geo.downstream.tasks import backbone_from_checkpoint

        model, sidecar = backbone_from_checkpoint(args.backbone)
        out.mkdir(parents=True, exist_ok=True)
        save_backbone(model, out / "backbone", sidecar)  # so `explora-geo export` can bundle it
    else:
        model, sidecar = load_backbone(args.backbone, num_classes=0)
    result = probe_backbone(model, sidecar, args.data, out, file_bands=args.file_bands, split=args.split,
                            seed=args.seed, batch_size=args.batch_size, epochs=args.epochs, device=device,
                            num_workers=args.workers)
    print(json.dumps({
        "top1": result.top1, "knn_top1": result.knn_top1, "per_class": result.per_class,
        "head": {k: v for k, v in result.head.items() if k != "grid"}, "knn_k": result.knn["k"],
        "n_train": result.n_train, "n_val": result.n_val, "n_test": result.n_test,
        "head_file": str(out / "head.safetensors"), "confusion_matrix": str(out / "confusion_matrix.png"),
    }))
    return 0

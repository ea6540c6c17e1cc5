"""``explora-geo export``: a backbone file (+ head) to an ONNX bundle for the QGIS plugin."""

from __future__ import annotations

import argparse
import json

from explora_geo.errors import ExploraGeoError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command."""
    parser = subparsers.add_parser(
        "export",
        help="export a backbone (+ classification head), or a segmenter, to ONNX for the QGIS plugin",
        description="Write the encoder, plus an optional classification head, or a trained segmenter "
                    "(ExploraSegmentationTask checkpoint: per-pixel logits), to an ONNX file with a dynamic "
                    "batch axis and the metadata the QGIS plugin needs (bands, scaling, GSD, tile size, "
                    "classes and colours), and the same metadata in a JSON file beside it.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="backbone file written by pretraining (<name>.safetensors or <name>.json), or "
                             "an ExploraClassificationTask checkpoint (.ckpt: its backbone and head), or an "
                             "ExploraSegmentationTask checkpoint (.ckpt: a segmenter bundle)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="output .onnx file (sidecar: same name .json)")
    parser.add_argument("--head", metavar="FILE", default=None,
                        help="classification head: a probe head (.safetensors/.json from `explora-geo probe`) "
                             "or a torchgeo ClassificationTask checkpoint (.ckpt; an explora-geo task checkpoint "
                             "also replaces the backbone by the one the head was trained with)")
    parser.add_argument("--segmenter", action="store_true",
                        help="require --checkpoint to be a segmentation checkpoint (ExploraSegmentationTask, e.g. "
                             "from `torchgeo fit --config configs/torchgeo_segmentation.yaml`); such checkpoints "
                             "are detected without it")
    parser.add_argument("--class-colors", metavar="HEX", nargs="+", default=None,
                        help="one #rrggbb colour per class (default: the head's, else a tab10/tab20 palette)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the onnxruntime vs torch comparison after export")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print one JSON line describing the bundle."""
    from explora_geo.export import export_onnx

    if args.segmenter and args.head:
        raise ExploraGeoError("--segmenter and --head exclude each other (a segmenter brings its own decoder); "
                              "drop --head.")
    if args.class_colors and not (args.head or args.checkpoint.endswith(".ckpt")):
        raise ExploraGeoError("--class-colors needs classes (--head FILE, or a task checkpoint); an embedder has "
                              "none.")
    onnx_path, json_path = export_onnx(args.checkpoint, args.out, head=args.head, class_colors=args.class_colors,
                                       check=not args.no_check, segmenter=True if args.segmenter else None)
    meta = json.loads(json_path.read_text())
    print(json.dumps({"onnx": str(onnx_path), "metadata": str(json_path), "model_type": meta["model_type"],
                      "bands": meta["bands"], "tile_size": meta["tile_size"], "gsd_m": meta["gsd_m"],
                      "embedding_dim": meta["embedding_dim"], "classes": meta["class_names"],
                      "onnx_opset": meta["onnx_opset"]}))
    return 0

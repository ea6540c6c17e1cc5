"""Segmentation: polygons -> image/mask chips (real T33UUU + OSM land use), decoder, task, torchgeo fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_downstream_common import make_backbone

from explora_geo.downstream.datamodule import MaskFolderDataModule
from explora_geo.downstream.masks import MaskDataset, random_split, scan_mask_folder, vector_labels_to_masks
from explora_geo.downstream.segmentation import ExploraSegmentationTask, ViTSegmenter
from explora_geo.errors import ExploraGeoError

REPO = Path(__file__).resolve().parents[2]
OSM = "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
RGBN = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def osm_masks(t33uuu_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("masks")
    vector_labels_to_masks(t33uuu_root / OSM, t33uuu_root / "IMG_DATA", out, class_column="fclass", chip_size=32,
                           bands=RGBN, min_labelled=0.6)
    return out


def test_masks_follow_the_polygons(osm_masks: Path, t33uuu_root: Path) -> None:
    import geopandas as gpd
    import rasterio
    from shapely.geometry import Point

    index = scan_mask_folder(osm_masks)
    assert index.classes == ("farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland")
    assert len(index) > 20
    polygons = gpd.read_file(t33uuu_root / OSM).to_crs(32633)
    checked = 0
    for image, mask_path in list(zip(index.images, index.masks, strict=True))[:8]:
        with rasterio.open(mask_path) as src, rasterio.open(image) as img:
            mask = src.read(1)
            assert img.descriptions == tuple(RGBN) and img.transform == src.transform
            assert (mask > 0).mean() >= 0.6 and mask.max() <= len(index.classes)
            for row, col in ((5, 5), (16, 16), (27, 9)):
                x, y = src.xy(row, col)
                hits = polygons[polygons.contains(Point(x, y))]
                allowed = {index.classes.index(c) + 1 for c in hits["fclass"]} or {0}
                assert mask[row, col] in allowed, (mask_path.name, row, col)
                checked += 1
    assert checked == 24
    meta = json.loads((osm_masks / "classes.json").read_text())
    assert meta["unlabelled"] == 0 and meta["class_column"] == "fclass"


def test_mask_dataset_reorders_bands_and_resizes_masks_exactly(osm_masks: Path) -> None:
    index = scan_mask_folder(osm_masks)
    plain = MaskDataset(index, [0], bands=RGBN)[0]
    swapped = MaskDataset(index, [0], bands=["B08", "B02"], img_size=64)[0]
    assert plain["image"].shape == (4, 32, 32) and plain["mask"].dtype == torch.int64
    assert swapped["image"].shape == (2, 64, 64) and swapped["mask"].shape == (64, 64)
    # nearest resize by 2: every source label appears as a 2x2 block
    assert torch.equal(swapped["mask"][::2, ::2], plain["mask"])
    with pytest.raises(ExploraGeoError, match=r"lacks band\(s\) B11"):
        MaskDataset(index, bands=["B02", "B11"])


def test_mask_errors(t33uuu_root: Path, tmp_path: Path) -> None:
    import geopandas as gpd

    with pytest.raises(ExploraGeoError, match="no class column 'landuse'.*fclass"):
        vector_labels_to_masks(t33uuu_root / OSM, t33uuu_root / "IMG_DATA", tmp_path, class_column="landuse")
    water = gpd.read_file(t33uuu_root / OSM)
    water[water["fclass"] == "water"].to_file(tmp_path / "water.gpkg")
    with pytest.raises(ExploraGeoError, match="single class"):
        vector_labels_to_masks(tmp_path / "water.gpkg", t33uuu_root / "IMG_DATA", tmp_path / "o",
                               class_column="fclass")
    far = water.copy()
    far.geometry = far.geometry.translate(1e6, 0)
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(ExploraGeoError, match="overlaps the raster"):
        vector_labels_to_masks(tmp_path / "far.gpkg", t33uuu_root / "IMG_DATA", tmp_path / "o",
                               class_column="fclass")
    with pytest.raises(ExploraGeoError, match="classes.json does not exist"):
        scan_mask_folder(tmp_path / "o")
    with pytest.raises(ExploraGeoError, match="too few"):
        random_split(2)


@pytest.mark.parametrize("kind", ["group_channel", "plain_vit"])
def test_vit_segmenter_shapes_and_modes(kind: str, tmp_path: Path) -> None:
    extra = {"architecture": "vit_tiny_patch16_224", "patch_size": 8, "in_chans": 4} if kind == "plain_vit" else {}
    weights = str(make_backbone(tmp_path / "bb", depth=3, **extra))
    c = 4 if kind == "plain_vit" else 10
    full = ExploraSegmentationTask(weights=weights, num_classes=5, n_blocks=2, decoder_dim=16)
    assert isinstance(full.model, ViTSegmenter) and full.model.n_blocks == 2
    out = full.model(torch.randn(2, c, 32, 32))
    assert out.shape == (2, 5, 32, 32)
    probe = ExploraSegmentationTask(weights=weights, num_classes=5, mode="linear_probe", decoder_dim=16)
    trainable = {n for n, p in probe.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") for n in trainable)
    lora = ExploraSegmentationTask(weights=weights, num_classes=5, mode="lora", decoder_dim=16)
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"backbone", "decoder"}
    assert all("lora_" in n for n in trainable if n.startswith("backbone."))


def test_segmentation_fit_on_real_masks(osm_masks: Path, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    weights = str(make_backbone(tmp_path / "bb", depth=2, architecture="vit_tiny_patch16_224", patch_size=8,
                                in_chans=4))
    data = MaskFolderDataModule(str(osm_masks), backbone=weights, batch_size=8)
    task = ExploraSegmentationTask(weights=weights, num_classes=len(data.classes) + 1, ignore_index=0,
                                   mode="lora", decoder_dim=16, lr=0.01)
    decoder_before = [p.clone() for p in task.model.decoder.parameters()]
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, task.model.decoder.parameters(), strict=True))
    assert task.hparams["labels"] == data.classes
    assert np.isfinite(trainer.callback_metrics["train_loss"].item())


@pytest.mark.slow
def test_torchgeo_fit_segmentation_config(t33uuu_root: Path, tmp_path: Path) -> None:
    """`torchgeo fit --config configs/torchgeo_segmentation.yaml` makes the masks from the OSM polygons and
    trains one quick pass on CPU; `explora-geo export --segmenter` turns its checkpoint into a segmenter bundle
    with the 8 land-use classes (the ignored 'unlabelled' channel left out)."""
    weights = str(make_backbone(tmp_path / "bb", depth=1, img_size=64))
    cmd = [str(Path(sys.executable).with_name("torchgeo")), "fit",
           "--config", str(REPO / "configs" / "torchgeo_segmentation.yaml"),
           "--model.init_args.weights", weights, "--data.init_args.backbone", weights,
           "--data.init_args.root", str(tmp_path / "masks"),
           "--data.init_args.vector", str(t33uuu_root / OSM),
           "--data.init_args.raster", str(t33uuu_root / "IMG_DATA"), "--data.init_args.min_labelled", "0.6",
           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
           "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "masks" / "classes.json").is_file()
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    from explora_geo.cli import main

    out = tmp_path / "segmenter.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--segmenter", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model_type"] == "segmenter" and meta["segmentation"]["ignore_index"] == 0
    assert meta["class_names"] == ["farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland"]
    import onnxruntime as ort

    logits = ort.InferenceSession(str(out)).run(["logits"], {"image": np.zeros((2, 10, 64, 64), np.float32)})[0]
    assert logits.shape == (2, 8, 64, 64)

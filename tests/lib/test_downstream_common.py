"""Helpers shared by the downstream tests (tiny backbones, small GeoTIFF chips), plus checks of the helpers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

S2_L1C_FILE_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def write_chip(path: Path, data: np.ndarray, names: Sequence[str] | None = None, *, epsg: int = 32633) -> Path:
    """Write ``data`` ``[C, H, W]`` as a GeoTIFF (band descriptions = ``names`` when given)."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=f"EPSG:{epsg}", transform=from_origin(300000, 5800000, 10, 10))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if names is not None:
            dst.descriptions = tuple(names)
    return path


def band_valued_chip(names: Sequence[str], size: int = 16) -> np.ndarray:
    """A chip whose band ``B``\\ NN is filled with the value 100 * (position of the band in S2 L1C order)."""
    values = [100 * (S2_L1C_FILE_ORDER.index(n) + 1) for n in names]
    return np.stack([np.full((size, size), v, dtype=np.uint16) for v in values])


def make_chip_folder(root: Path, classes: dict[str, int], names: Sequence[str] = S2_L1C_FILE_ORDER,
                     size: int = 16, seed: int = 0, describe: bool = True) -> Path:
    """A chip folder with ``classes[name]`` random chips per class; class k has a brighter band k."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(classes.items()):
        for i in range(n):
            data = rng.integers(500, 1500, size=(len(names), size, size)).astype(np.uint16)
            data[k % len(names)] += 3000
            write_chip(root / name / f"{name}_{i}.tif", data, names if describe else None)
    return root


def make_backbone(path: Path, *, depth: int = 2, img_size: int = 32, sensor: str = "sentinel2",
                  architecture: str = "group_channel_vit_tiny_patch8_96", seed: int = 0, **kwargs) -> Path:
    """Save a randomly initialised tiny backbone with ``save_backbone``; returns the .safetensors path.

    A plain timm ViT (``architecture="vit_tiny_patch16_224", patch_size=8, in_chans=C``) gets the first C
    model bands of ``sensor``."""
    import timm

    import explora_geo.models  # noqa: F401
    from explora_geo.checkpoint import save_backbone
    from explora_geo.normalization import Normalization
    from explora_geo.sensors import get_sensor

    torch.manual_seed(seed)
    model_kwargs = {"depth": depth, "img_size": img_size, **kwargs}
    model = timm.create_model(architecture, num_classes=0, **model_kwargs)
    if getattr(model, "band_names", None) is None:  # a plain timm ViT: the sensor's model bands, in order
        model.band_names = get_sensor(sensor).model_bands[: model_kwargs.get("in_chans", 3)]
    normalization = Normalization.for_sensor(sensor, model.band_names, scheme="reflectance")
    weights, _ = save_backbone(model, path, {"model_kwargs": model_kwargs, "sensor": sensor, "gsd_m": 10.0,
                                             "normalization": normalization.to_dict()})
    return weights


def test_band_valued_chip_encodes_band_identity() -> None:
    chip = band_valued_chip(["B8A", "B02"], size=4)
    assert chip.shape == (2, 4, 4)
    assert chip[0, 0, 0] == 900 and chip[1, 0, 0] == 200


def test_make_backbone_round_trips(tmp_path: Path) -> None:
    from explora_geo.checkpoint import load_backbone

    weights = make_backbone(tmp_path / "bb")
    model, sidecar = load_backbone(weights)
    assert sidecar["model_kwargs"] == {"depth": 2, "img_size": 32}
    assert len(model.blocks) == 2
    with pytest.raises(Exception):
        load_backbone(tmp_path / "missing")

"""Normalisation schemes: math, band selection, serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization


def test_reflectance_with_l2a_offset() -> None:
    norm = Normalization("reflectance", ("B02", "B03"), offset=(1000.0, 1000.0), divide=10000.0)
    x = torch.full((2, 2, 3, 3), 3000.0)
    assert torch.allclose(norm(x), torch.full_like(x, 0.2))


def test_satmae_clips_to_two_sigma_and_scales_to_unit_interval() -> None:
    norm = Normalization.for_sensor("sentinel2", ["B04", "B02"], scheme="satmae")
    mean_b04, std_b04 = 1136.26, 965.23
    x = torch.tensor([mean_b04 - 3 * std_b04, mean_b04, mean_b04 + std_b04, 1e6]).reshape(1, 4, 1)
    x = torch.cat([x, x], dim=0)[None]  # [1, 2, 4, 1]
    y = norm(x)[0, 0, :, 0]
    assert torch.allclose(y, torch.tensor([0.0, 0.5, 0.75, 1.0]), atol=1e-6)


def test_meanstd_matches_formula_and_numpy_equals_torch() -> None:
    norm = Normalization.for_sensor("sentinel2", ["B08", "B11", "B12"], scheme="meanstd")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5000, size=(2, 3, 4, 4)).astype(np.float32)
    expected = (x - np.array(norm.mean, np.float32)[:, None, None]) / np.array(norm.std, np.float32)[:, None, None]
    np.testing.assert_allclose(norm(x), expected, rtol=1e-6)
    np.testing.assert_allclose(norm(torch.from_numpy(x)).numpy(), expected, rtol=1e-6)
    for scheme in ("satmae", "reflectance", "none"):
        other = Normalization.for_sensor("sentinel2", ["B08", "B11", "B12"], scheme=scheme)
        np.testing.assert_allclose(other(x), other(torch.from_numpy(x)).numpy(), rtol=1e-6)


def test_select_reorders_by_name_and_roundtrips_json() -> None:
    norm = Normalization.for_sensor("sentinel2", ["B02", "B03", "B04"], scheme="meanstd")
    sub = norm.select(["B04", "B02"])
    assert sub.bands == ("B04", "B02") and sub.mean == (norm.mean[2], norm.mean[0])
    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm


def test_bad_inputs_are_clear() -> None:
    with pytest.raises(ExploraGeoError, match="unknown normalisation 'zscore'"):
        Normalization("zscore", ("B02",))  # type: ignore[arg-type]
    with pytest.raises(ExploraGeoError, match="needs per-band mean and std"):
        Normalization("meanstd", ("B02",))
    with pytest.raises(ExploraGeoError, match="mean has 1 values for 2 bands"):
        Normalization("meanstd", ("B02", "B03"), mean=(1.0,), std=(1.0, 1.0))
    norm = Normalization("reflectance", ("B02", "B03"))
    with pytest.raises(ExploraGeoError, match="expects 2 bands"):
        norm(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ExploraGeoError, match="lacks band"):
        norm.select(["B08"])

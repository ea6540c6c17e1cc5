"""Multi-crop augmentation for DINO-style training, for images with any number of bands.

Built from kornia augmentations, so it runs on the training device (GPU) on whole batches. Everything here is
valid for multispectral input: geometric transforms (random resized crop, horizontal and vertical flips,
both fine for overhead imagery), Gaussian blur and noise act per band, and the "colour" jitter is a per-band
gain and offset plus a global brightness factor, so it never assumes three RGB channels (no hue / saturation /
grey-scale, which are defined for RGB only and would mix unrelated spectral bands).

The blur and solarisation probabilities follow DINOv2's recipe: Gaussian blur with p = 1.0 on the first
global crop, p = 0.1 on the second, p = 0.5 on every local crop; solarisation with p = 0.2 on the second
global crop only, and only for RGB input (``MultiCrop(config, rgb=True)``): inverting bright values is an
RGB photometric trick, meaningless for, e.g., a SWIR band.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor, nn

__all__ = ["MultiCropConfig", "MultiCrop", "band_jitter", "random_flips"]


@dataclass
class MultiCropConfig:
    """Multi-crop settings (DINOv2 defaults: 2 global crops, scale 0.32-1; 8 local crops, scale 0.05-0.32).

    Args:
        global_size, local_size: crop sides in pixels (multiples of the patch size). ``0`` = derived from the
            backbone by the DINOv2 objective: global = its ``img_size`` (224 for a ViT-L/14), local = 7/16 of
            that rounded to whole patches (98 for 224 px and patch 14, as in DINOv2).
        n_global: global crops (2 in DINO; the teacher sees these).
        n_local: local crops (student only); 0 disables them.
        global_scale, local_scale: (min, max) area fraction of the source image each crop covers.
        jitter_p: probability of the band jitter per crop.
        gain, offset, brightness: band-jitter strengths: per-band gain ``1 +- gain``, per-band offset
            ``+- offset`` (in normalised units), global brightness factor ``1 +- brightness``.
        global_blur_p: probability of a Gaussian blur (sigma 0.1-2 px) for global crop 1, 2, ... (the last
            entry repeats for further global crops); DINOv2: ``(1.0, 0.1)``.
        local_blur_p: probability of a Gaussian blur for each local crop; DINOv2: 0.5.
        solarize_p: probability of solarisation (values >= 0.5 become ``1 - x``; input scaled to [0, 1], as
            the ``satmae`` and ``reflectance`` scalings do; the result is clipped to [0, 1]) for global crop
            1, 2, ... (last entry repeats); DINOv2: ``(0.0, 0.2)``. Applied only when :class:`MultiCrop` is
            built with ``rgb=True``.
        noise_std: std of additive Gaussian noise (normalised units), 0 = off.
    """

    global_size: int = 0
    local_size: int = 0
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    jitter_p: float = 0.8
    gain: float = 0.2
    offset: float = 0.05
    brightness: float = 0.2
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    solarize_p: tuple[float, ...] = (0.0, 0.2)
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("global_blur_p", "solarize_p"):
            value = getattr(self, name)
            value = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
            if not value:
                raise ValueError(f"{name} needs at least one probability, got {value!r}")
            setattr(self, name, value)
        for name, values in (("global_blur_p", self.global_blur_p), ("solarize_p", self.solarize_p),
                             ("local_blur_p", (self.local_blur_p,)), ("jitter_p", (self.jitter_p,))):
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"{name} must hold probabilities in [0, 1], got {getattr(self, name)!r}")

    def for_global(self, values: tuple[float, ...], i: int) -> float:
        """Entry ``i`` of a per-global-crop tuple (the last entry repeats)."""
        return values[min(i, len(values) - 1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiCropConfig:
        """Inverse of :meth:`to_dict` (JSON lists become tuples again); absent keys keep their defaults."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def band_jitter(images: Tensor, *, p: float, gain: float, offset: float, brightness: float) -> Tensor:
    """Random per-image, per-band affine jitter ``x * brightness * gain_c + offset_c`` (any number of bands).

    Args:
        images: ``[B, C, H, W]`` normalised.
        p: probability that an image is jittered.
        gain, offset, brightness: half-widths of the uniform draws (see :class:`MultiCropConfig`).

    Returns:
        ``[B, C, H, W]``, same dtype/device. Uses the global torch RNG.
    """
    b, c = images.shape[:2]
    dev, dt = images.device, images.dtype

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, 1, 1, device=dev, dtype=dt) * 2 - 1

    apply = (torch.rand(b, 1, 1, 1, device=dev) < p).to(dt)
    scale = (1 + brightness * uniform(b, 1)) * (1 + gain * uniform(b, c))
    shift = offset * uniform(b, c)
    return images * (1 + apply * (scale - 1)) + apply * shift


def random_flips(images: Tensor) -> Tensor:
    """Flip each image horizontally and/or vertically with probability 1/2 each (``[B, C, H, W]``)."""
    b = images.shape[0]
    h = (torch.rand(b, 1, 1, 1, device=images.device) < 0.5)
    v = (torch.rand(b, 1, 1, 1, device=images.device) < 0.5)
    images = torch.where(h, images.flip(-1), images)
    return torch.where(v, images.flip(-2), images)


class MultiCrop(nn.Module):
    """Global and local crops of a batch: ``forward(images) -> (global_crops, local_crops)``.

    Args:
        config: :class:`MultiCropConfig`.
        rgb: the input is 3-band RGB: enables solarisation (``config.solarize_p``).

    ``forward`` takes ``[B, C, H, W]`` and returns two lists: ``n_global`` tensors ``[B, C, Sg, Sg]`` and
    ``n_local`` tensors ``[B, C, Sl, Sl]``. Each crop of each image gets its own random parameters. Global
    crop ``i`` has its own blur (``global_blurs[i]``) and solarisation (``global_solarize[i]``) ops, so their
    probabilities differ per crop as in DINOv2; all local crops are made in one batched kornia call (the batch
    repeated ``n_local`` times), so the per-call overhead does not grow with the number of crops.
    """

    def __init__(self, config: MultiCropConfig, *, rgb: bool = False) -> None:
        super().__init__()
        if config.global_size <= 0 or (config.n_local and config.local_size <= 0):
            raise ValueError(f"crop sizes must be positive, got {config.global_size} and {config.local_size}")
        self.config = config
        self.rgb = rgb
        self.global_crop = K.RandomResizedCrop((config.global_size,) * 2, scale=config.global_scale,
                                               ratio=(3 / 4, 4 / 3))
        self.local_crop = K.RandomResizedCrop((config.local_size,) * 2, scale=config.local_scale,
                                              ratio=(3 / 4, 4 / 3))
        n = config.n_global
        self.global_blurs = nn.ModuleList(
            _blur(config.global_size, config.for_global(config.global_blur_p, i)) for i in range(n))
        self.local_blur = _blur(config.local_size, config.local_blur_p)
        self.global_solarize = nn.ModuleList(
            _solarize(config.for_global(config.solarize_p, i) if rgb else 0.0) for i in range(n))
        self.noise = K.RandomGaussianNoise(std=config.noise_std, p=0.5) if config.noise_std > 0 else None

    def _photometric(self, x: Tensor, blur: nn.Module, solarize: nn.Module | None = None) -> Tensor:
        """Blur, noise, band jitter, then solarisation, each with its own probability (``[N, C, S, S]``)."""
        cfg = self.config
        x = blur(x)  # identity when the probability is 0
        if self.noise is not None:
            x = self.noise(x)
        x = band_jitter(x, p=cfg.jitter_p, gain=cfg.gain, offset=cfg.offset, brightness=cfg.brightness)
        return x if solarize is None else solarize(x)  # identity unless RGB with a probability > 0

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """See the class docstring."""
        images = images.float()
        cfg = self.config
        with torch.autocast(device_type=images.device.type, enabled=False):  # warps stay in float32
            global_crops = [
                self._photometric(random_flips(self.global_crop(images)), blur, solarize)
                for blur, solarize in zip(self.global_blurs, self.global_solarize, strict=True)
            ]
            local_crops: list[Tensor] = []
            if cfg.n_local:
                x = random_flips(self.local_crop(images.repeat(cfg.n_local, 1, 1, 1)))
                local_crops = list(self._photometric(x, self.local_blur).chunk(cfg.n_local))
            return global_crops, local_crops


def _blur(size: int, p: float) -> nn.Module:
    """kornia Gaussian blur (sigma 0.1-2 px, kernel about a tenth of the crop, odd) with probability ``p``
    (``nn.Identity`` for ``p = 0``)."""
    if p <= 0:
        return nn.Identity()
    kernel = max(3, (size // 10) | 1)
    return K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=p)


def _solarize(p: float) -> nn.Module:
    """kornia solarisation at threshold 0.5 (``x >= 0.5 -> 1 - x``, input in [0, 1], output clipped to
    [0, 1]) with probability ``p`` (``nn.Identity`` for ``p = 0``)."""
    return K.RandomSolarize(thresholds=0.0, additions=0.0, p=p) if p > 0 else nn.Identity()

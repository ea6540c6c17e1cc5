"""Multi-crop augmentation for DINO-style training, for images with any number of bands.

Built from kornia augmentations, so it runs on the training device (GPU) on whole batches. Everything here is
valid for multispectral input: geometric transforms (random resized crop, horizontal and vertical flips,
both fine for overhead imagery), Gaussian blur and noise act per band, and the "colour" jitter is a per-band
gain and offset plus a global brightness factor, so it never assumes three RGB channels (no hue / saturation /
grey-scale, which are defined for RGB only and would mix unrelated spectral bands).
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
        blur_p: probability of a Gaussian blur per crop (sigma 0.1-2 px).
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
    blur_p: float = 0.5
    noise_std: float = 0.0

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

    ``forward`` takes ``[B, C, H, W]`` and returns two lists: ``n_global`` tensors ``[B, C, Sg, Sg]`` and
    ``n_local`` tensors ``[B, C, Sl, Sl]``. Each crop of each image gets its own random parameters. All crops
    of one kind are made in one batched kornia call (the batch repeated ``n`` times), so the per-call
    overhead does not grow with the number of crops.
    """

    def __init__(self, config: MultiCropConfig) -> None:
        super().__init__()
        if config.global_size <= 0 or (config.n_local and config.local_size <= 0):
            raise ValueError(f"crop sizes must be positive, got {config.global_size} and {config.local_size}")
        self.config = config
        self.global_crop = K.RandomResizedCrop((config.global_size,) * 2, scale=config.global_scale,
                                               ratio=(3 / 4, 4 / 3))
        self.local_crop = K.RandomResizedCrop((config.local_size,) * 2, scale=config.local_scale,
                                              ratio=(3 / 4, 4 / 3))
        self.global_blur = self._blur(config.global_size)
        self.local_blur = self._blur(config.local_size)
        self.noise = K.RandomGaussianNoise(std=config.noise_std, p=0.5) if config.noise_std > 0 else None

    def _blur(self, size: int) -> nn.Module | None:
        if self.config.blur_p <= 0:
            return None
        kernel = max(3, (size // 10) | 1)
        return K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=self.config.blur_p)

    def _views(self, images: Tensor, n: int, crop: nn.Module, blur: nn.Module | None) -> list[Tensor]:
        if n == 0:
            return []
        cfg = self.config
        x = random_flips(crop(images.repeat(n, 1, 1, 1)))
        if blur is not None:
            x = blur(x)
        if self.noise is not None:
            x = self.noise(x)
        x = band_jitter(x, p=cfg.jitter_p, gain=cfg.gain, offset=cfg.offset, brightness=cfg.brightness)
        return list(x.chunk(n))

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """See the class docstring."""
        images = images.float()
        with torch.autocast(device_type=images.device.type, enabled=False):  # warps stay in float32
            return (self._views(images, self.config.n_global, self.global_crop, self.global_blur),
                    self._views(images, self.config.n_local, self.local_crop, self.local_blur))

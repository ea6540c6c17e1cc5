"""Self-supervised objectives for ExPLoRA pre-training: one objective per file, each owning its heads and loss.

- :mod:`explora_geo.objectives.mae`: masked autoencoding (SatMAE group-channel aware);
- :mod:`explora_geo.objectives.dinov2`: DINO + iBOT + KoLeo with an EMA teacher;
- :mod:`explora_geo.objectives.masking`: token masks and the hooks that apply them inside a ViT.
"""

from explora_geo.objectives.base import Objective

__all__ = ["Objective", "OBJECTIVES"]

OBJECTIVES: tuple[str, ...] = ("mae", "dinov2")

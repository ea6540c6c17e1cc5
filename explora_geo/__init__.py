"""explora-geo: ExPLoRA (parameter-efficient extended pre-training of ViTs) for Earth observation.

Importing the package is cheap; sub-modules import torch and friends. ``import explora_geo.models`` registers
the group-channel ViTs in timm's model registry.
"""

__version__ = "0.1.0"

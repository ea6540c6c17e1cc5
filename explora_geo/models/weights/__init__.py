"""Source weights: find a pre-trained checkpoint, convert it, and load it strictly into a backbone.

``load_source_weights(model, spec)`` accepts:

- ``"random"``: no weights (the report says so loudly);
- a local file (:mod:`.local_files`): ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``) or
  ``.safetensors`` (with an explora-geo ``.json`` sidecar when it is a merged backbone). Containers
  (``model``, ``state_dict``, ``teacher``) and prefixes (``module.``, ``backbone.``, Lightning's ``model.``
  ...) are unwrapped by locating the ViT blocks; official DINOv2 files (:mod:`.dinov2_files`: ``mask_token``,
  ``register_tokens``, LayerScale) and MAE files (:mod:`.mae_files`, with or without the decoder) are
  recognised;
- a timm pretrained name (:mod:`.timm_hub`, ``vit_large_patch14_dinov2.lvd142m``), resolved through timm's
  pretrained config and the Hugging Face cache (``HF_HUB_OFFLINE=1`` works when the file is cached);
- a torchgeo weight name (:mod:`.torchgeo_weights`, ``ViTSmall16_Weights.SENTINEL2_ALL_DINO``), resolved
  through torch.hub's cache.

One module per source format; :mod:`.rgb_to_group` maps RGB / multi-band kernels onto the model's bands,
:mod:`.loading` converts and loads strictly, :mod:`.report` holds :class:`LoadReport`.
"""

from explora_geo.models.weights.dinov2_files import match_layer_scale
from explora_geo.models.weights.loading import load_source_weights, resolve_source, split_extra
from explora_geo.models.weights.local_files import read_checkpoint_file, unwrap_state_dict
from explora_geo.models.weights.report import LoadReport, SourceCheckpoint
from explora_geo.models.weights.rgb_to_group import band_kernels, infer_sensor, rgb_to_group_kernels

__all__ = [
    "LoadReport",
    "SourceCheckpoint",
    "band_kernels",
    "infer_sensor",
    "load_source_weights",
    "match_layer_scale",
    "read_checkpoint_file",
    "resolve_source",
    "rgb_to_group_kernels",
    "split_extra",
    "unwrap_state_dict",
]

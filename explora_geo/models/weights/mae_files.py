"""Official MAE checkpoints (``{"model": {...}}``): encoder-only ``mae_pretrain_vit_*.pth`` files, or
"visualize"/full files that also hold the decoder (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``). The decoder goes to the MAE objective under its
original names (:class:`explora_geo.objectives.mae.MAEDecoder` loads and reports it)."""

from __future__ import annotations

from explora_geo.models.weights.report import StateDict

__all__ = ["is_mae_decoder_key", "split_mae_decoder"]


def is_mae_decoder_key(key: str) -> bool:
    """A decoder tensor of an official MAE file (``decoder_*``)."""
    return key.startswith("decoder_")


def split_mae_decoder(state_dict: StateDict) -> tuple[StateDict, StateDict]:
    """``(encoder, decoder)``: the decoder's ``decoder_*`` keys and, when there is a decoder, its
    ``mask_token``, under their original names; everything else is the encoder."""
    has_decoder = any(is_mae_decoder_key(k) for k in state_dict)
    decoder = {k: v for k, v in state_dict.items() if is_mae_decoder_key(k) or (has_decoder and k == "mask_token")}
    return {k: v for k, v in state_dict.items() if k not in decoder}, decoder

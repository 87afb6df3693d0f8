"""Sparse autoencoders as pure functions over a pytree."""

from jsae.sae.core import (
    SAE,
    SAESpec,
    activate,
    decode,
    decode_normalized,
    encode,
    encode_normalized,
    fold_norm,
    pre_activations,
    reconstruct,
)
from jsae.sae.init import geometric_median, init_sae, norm_scale_for
from jsae.sae.losses import auxk_loss, sae_loss
from jsae.sae.spec import mm

__all__ = [
    "SAE", "SAESpec", "activate", "auxk_loss", "decode", "decode_normalized", "encode",
    "encode_normalized", "fold_norm", "geometric_median", "init_sae", "mm", "norm_scale_for",
    "pre_activations", "reconstruct", "sae_loss",
]

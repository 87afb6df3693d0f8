"""jsae: sparse autoencoders for finding the concepts inside language models, in JAX.

    import jsae
    sae = jsae.sae.init_sae(key, jsae.sae.SAESpec("topk", d_in=640, d_sae=10240, k=32), sample)
    z = jsae.sae.encode(sae, x)            # [..., d_sae]
    x_hat = jsae.sae.decode(sae, z)        # [..., d_in]
"""

from jsae import config, sae
from jsae.sae import SAE, SAESpec, decode, encode, init_sae

__version__ = "0.1.0"

__all__ = ["SAE", "SAESpec", "config", "decode", "encode", "init_sae", "sae", "__version__"]

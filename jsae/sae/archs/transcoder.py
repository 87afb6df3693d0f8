"""TopK transcoders: encode one hook, reconstruct another (Dunefsky et al. 2024; sparsify).

``transcoder``: z = relu(top_k(x_in W_enc + b_enc)), x_hat = z W_dec + b_dec, trained on
||x_hat - x_target||^2 (+ AuxK on the residual x_target - x_hat), e.g. x_in an MLP's input
(blocks.L.hook_resid_mid) and x_target its output (blocks.L.hook_mlp_out).
``skip_transcoder`` adds an affine skip connection (Paulo et al. 2025, "skip transcoder";
Gemma Scope 2's ``affine_skip_connection``): x_hat += x_in W_skip, W_skip [d_in, d_in]
initialised to zero, so the dictionary only has to explain what a linear map cannot.

Shapes: x_in, x_target [B, d_in] (d_out == d_in: `SAESpec` has one width, which holds for the
MLP of a transformer block); W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in] is the
output bias.  Unlike an SAE the input is not centred by b_dec (the two hooks live in different
spaces; SAELens's transcoders do the same).  One ``norm_scale`` multiplies both hooks, so
raw-unit encode / decode stay consistent (`jsae.sae.core.fold_norm` holds: the skip term
(x s) W_skip / s = x W_skip).  No sparse fast path: the dense loss is used.
"""

from __future__ import annotations

import jax.numpy as jnp

from jsae.sae.archs import register
from jsae.sae.archs.topk import TopK


class Transcoder(TopK):
    name = "transcoder"
    skip: bool = False
    supports_fast = False
    fast_blockwise = False
    sharded_fast = False
    saelens_name = None  # SAELens's Transcoder is a ReLU one: a TopK one does not map onto it
    saelens_imports = ()

    def extra_params(self, spec, **opts):
        if not self.skip:
            return {}
        return {"W_skip": jnp.zeros((spec.d_in, spec.d_in), jnp.float32)}

    def pre_activations(self, sae, x_n):
        """x_in W_enc + b_enc (no b_dec centring: b_dec is the target's bias)."""
        from jsae.sae.core import _mm

        p = sae.params
        return _mm(x_n, p["W_enc"], sae.spec.compute_dtype) + p["b_enc"]

    def decode(self, sae, z, x_in=None):
        """z W_dec + b_dec (+ x_in W_skip for the skip transcoder)."""
        from jsae.sae.core import _mm

        p = sae.params
        out = _mm(z, p["W_dec"], sae.spec.compute_dtype) + p["b_dec"]
        if not self.skip:
            return out
        if x_in is None:
            raise ValueError("a skip transcoder's decode needs its encoded input x_in "
                             "(use jsae.sae.core.decode_normalized(sae, z, x_n))")
        return out + _mm(x_in, p["W_skip"], sae.spec.compute_dtype)

    def fast_applies(self, batch_topk_fn) -> bool:
        return False


class SkipTranscoder(Transcoder):
    name = "skip_transcoder"
    skip = True


register(Transcoder())
register(SkipTranscoder())

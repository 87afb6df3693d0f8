"""Acausal crosscoder (Anthropic, "Sparse Crosscoders", 2024): one dictionary that reads and
reconstructs several hooks at once (e.g. the residual stream after layers 3, 6 and 9).

Shapes, for L = ``n_layers`` hooks (an option set from ``model.hooks``): x_n [B, L, d_in], W_enc [L, d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, L, d_in] (latent axis 0, as every decoder), b_dec [L, d_in].

    z     = relu( sum_l x_l W_enc[l] + b_enc )                 (no b_dec centring, as the paper)
    x_hat = z W_dec + b_dec                                     (every hook at once)
    loss  = sum_l ||x_hat_l - x_l||^2  +  l1 * sum_i z_i sum_l ||W_dec[i, l]||

The sparsity term weights each code by the sum of its decoder norms over the hooks, so a
feature pays once per hook it writes to: features that live at one hook keep the others' decoder
rows near zero, and ``layer_profile`` shows where each writes.  Decoder rows are free (no unit
constraint), initialised at norm 0.1 per hook; W_enc[l] = W_dec[:, l]^T.  One ``norm_scale``
for all hooks (E||x_l||^2 = d_in averaged over hooks).  No SAELens format (it has none).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.archs import OptionError, register
from jsae.sae.archs.base import Arch, LossInputs


class Crosscoder(Arch):
    name = "crosscoder"
    rank = 10
    coef_field = "l1_coef"
    multi_hook = True
    derived_options = ("n_layers",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        l1_coef: float = 5.0  # sparsity coefficient (after normalisation)
        n_layers: int = 2  # hooks read and reconstructed at once (from model.hooks)

    def config_options(self, options, *, n_hooks):
        return dataclasses.replace(options, n_layers=n_hooks)

    def check(self, options, d_sae, d_sae_key="d_sae"):
        if options.l1_coef < 0:
            raise OptionError("l1_coef", "must be >= 0")
        if options.n_layers < 2:
            raise OptionError("n_layers", "a crosscoder reads several hooks: give model.hooks "
                              f"two or more (got {options.n_layers})")

    def n_hooks(self, spec):
        return spec.options.n_layers

    def token_shape(self, spec):
        return (spec.options.n_layers, spec.d_in)

    def layer_profile(self, sae):
        return layer_profile(sae)

    def unit_decoder(self, spec) -> bool:
        return False

    def extra_params(self, spec, *, key=None, **opts):
        """Replaces the plain SAE's W_enc / W_dec / b_dec with the per-hook shapes."""
        key = jax.random.key(0) if key is None else key
        w = jax.random.normal(key, (spec.d_sae, spec.options.n_layers, spec.d_in), jnp.float32)
        w = 0.1 * w / jnp.linalg.norm(w, axis=-1, keepdims=True)
        return {"W_dec": w, "W_enc": jnp.transpose(w, (1, 2, 0)),
                "b_dec": jnp.zeros((spec.options.n_layers, spec.d_in), jnp.float32)}

    def param_shapes(self, spec):
        n, L, d = spec.d_sae, spec.options.n_layers, spec.d_in
        return {"W_enc": (L, d, n), "W_dec": (n, L, d), "b_enc": (n,), "b_dec": (L, d)}

    def decoder_directions(self, params, features):
        """The rows at the last hook (nearest the unembedding), for logit effects."""
        return params["W_dec"][features, -1]

    def pre_activations(self, sae, x_n):
        p = sae.params
        dt = sae.spec.compute_dtype
        pre = jnp.einsum("...ld,ldn->...n", x_n.astype(dt), p["W_enc"].astype(dt),
                         preferred_element_type=jnp.float32)
        return pre + p["b_enc"]

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        return jax.nn.relu(pre)

    def decode(self, sae, z, x_in=None):
        p = sae.params
        dt = sae.spec.compute_dtype
        out = jnp.einsum("...n,nld->...ld", z.astype(dt), p["W_dec"].astype(dt),
                         preferred_element_type=jnp.float32)
        return out + p["b_dec"]

    def loss_terms(self, sae, t: LossInputs):
        norms = jnp.sum(jnp.linalg.norm(sae.params["W_dec"], axis=-1), axis=-1)  # [d_sae]
        return {"sparsity": t.sparsity_coef * jnp.sum(t.z * norms, axis=-1).mean()}


def layer_profile(sae) -> np.ndarray:
    """``[d_sae, L]``: each feature's decoder norm per hook, as a fraction of its total (a row
    sums to 1): where a feature writes."""
    norms = np.linalg.norm(np.asarray(sae.params["W_dec"], np.float64), axis=-1)
    return norms / np.maximum(norms.sum(-1, keepdims=True), 1e-12)


register(Crosscoder())

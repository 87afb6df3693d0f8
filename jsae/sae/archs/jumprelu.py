"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): z = pre * H(pre - theta) with a
learned per-latent threshold theta = exp(log_threshold), trained with straight-through
threshold gradients.  The sparsity term (``spec.jumprelu_sparsity``; coef = sae.l0_coef):

- ``step`` (default):  coef * sum_i H(pre_i - theta_i)                      (the L0)
- ``tanh``:            coef * sum_i tanh(c |z_i| ||W_dec_i||)   (Anthropic, 2025; c =
  ``spec.jumprelu_tanh_scale``, SAELens's ``jumprelu_tanh_scale``, default 4)
- ``quadratic``:       coef * (L0 / target_l0 - 1)^2 with L0 the batch mean of the step L0
  (a penalty towards ``spec.target_l0`` rather than towards zero, as Gemma Scope 2 trains)

(each averaged over tokens).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jsae.sae.archs import register
from jsae.sae.archs.base import Arch
from jsae.sae.jumprelu import heaviside_ste, jumprelu_ste


class JumpReLU(Arch):
    name = "jumprelu"
    coef_field = "l0_coef"
    extra_latent_axes = {"log_threshold": 0}
    saelens_name = "jumprelu"
    saelens_imports = ("jumprelu",)

    def extra_params(self, spec, *, jumprelu_init_threshold: float = 1e-3, **opts):
        return {"log_threshold": jnp.full((spec.d_sae,), np.log(jumprelu_init_threshold),
                                          jnp.float32)}

    def threshold(self, params):
        return jnp.exp(params["log_threshold"])

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        return jumprelu_ste(pre, jnp.exp(sae.params["log_threshold"]),
                            sae.spec.jumprelu_bandwidth)

    def loss_terms(self, sae, t):
        spec, p = sae.spec, sae.params
        mode = spec.jumprelu_sparsity
        if mode == "tanh":
            dec_norm = jnp.linalg.norm(p["W_dec"], axis=-1)
            per_tok = jnp.sum(jnp.tanh(spec.jumprelu_tanh_scale * jnp.abs(t.z) * dec_norm), -1)
            return {"sparsity": t.sparsity_coef * per_tok.mean()}
        l0 = jnp.sum(heaviside_ste(t.pre, jnp.exp(p["log_threshold"]),
                                   spec.jumprelu_bandwidth), axis=-1).mean()
        if mode == "step":
            return {"sparsity": t.sparsity_coef * l0}
        if mode == "quadratic":
            if not spec.target_l0 or spec.target_l0 <= 0:
                raise ValueError("sae.target_l0 must be > 0 for jumprelu_sparsity=quadratic")
            return {"sparsity": t.sparsity_coef * (l0 / spec.target_l0 - 1.0) ** 2}
        raise ValueError(f"sae.jumprelu_sparsity={mode!r}: expected step, tanh or quadratic")

    def to_saelens(self, params):
        return {**super().to_saelens(params), "threshold": np.asarray(jnp.exp(params["log_threshold"]))}

    def saelens_required(self, saelens_arch):
        return ("b_enc", "threshold")

    def from_saelens(self, saelens_arch, t, shift, source):
        thr = t["threshold"]
        if np.any(thr < 0):
            raise ValueError(f"{source}: negative JumpReLU thresholds are not supported")
        with np.errstate(divide="ignore"):
            log_thr = np.log(thr).astype(np.float32)
        return {**super().from_saelens(saelens_arch, t, shift, source), "log_threshold": log_thr}


register(JumpReLU())

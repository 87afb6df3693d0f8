"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): z = pre * H(pre - theta) with a
learned per-latent threshold theta = exp(log_threshold), trained with straight-through
threshold gradients.  The sparsity term (``spec.jumprelu_sparsity``; coef = sae.l0_coef):

- ``step`` (default):  coef * sum_i H(pre_i - theta_i)                      (the L0)
- ``tanh``:            coef * sum_i tanh(c |z_i| ||W_dec_i||)   (Anthropic, 2025; c =
  ``spec.jumprelu_tanh_scale``, SAELens's ``jumprelu_tanh_scale``, default 4)
- ``quadratic``:       coef * (2 / T) (L0_t - T)^2 with L0_t a token's step L0 and
  T = ``spec.target_l0`` (Gemma Scope 2's penalty towards a target rather than towards zero,
  in the per-token form SAELens 6 implements; it also penalises the spread of L0 over tokens)

(each averaged over tokens).

The threshold is a parameter ``log_threshold`` (``spec.jumprelu_threshold="log"``, Gemma
Scope's and the default) or ``threshold`` (``"linear"``).  Under Adam a log parameter moves by
about lr per step in log space whatever its gradient, so from a small initial threshold it
takes thousands of steps to reach the threshold a target L0 needs (SAELens #718; measured in
tests/test_arch_jumprelu.py); a linear one moves by about lr in activation units and gets
there in hundreds.  A linear threshold is kept >= 0 after each step.
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
    extra_latent_axes = {"log_threshold": 0, "threshold": 0}
    saelens_name = "jumprelu"
    saelens_imports = ("jumprelu",)

    def check_spec(self, spec):
        if spec.jumprelu_threshold not in ("log", "linear"):
            raise ValueError(f"sae.jumprelu_threshold={spec.jumprelu_threshold!r}: expected "
                             "log or linear")

    def extra_params(self, spec, *, jumprelu_init_threshold: float = 1e-3, **opts):
        if spec.jumprelu_threshold == "linear":
            return {"threshold": jnp.full((spec.d_sae,), jumprelu_init_threshold, jnp.float32)}
        return {"log_threshold": jnp.full((spec.d_sae,), np.log(jumprelu_init_threshold),
                                          jnp.float32)}

    def threshold(self, params):
        """theta [d_sae] from either parameterisation (old SAEs carry log_threshold)."""
        if "log_threshold" in params:
            return jnp.exp(params["log_threshold"])
        return params["threshold"]

    def after_update(self, params, z, step=None):
        if "threshold" in params:  # projected step: a threshold below 0 would pass negatives
            return {**params, "threshold": jnp.maximum(params["threshold"], 0.0)}
        return params

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        return jumprelu_ste(pre, self.threshold(sae.params), sae.spec.jumprelu_bandwidth)

    def loss_terms(self, sae, t):
        spec, p = sae.spec, sae.params
        mode = spec.jumprelu_sparsity
        if mode == "tanh":
            dec_norm = jnp.linalg.norm(p["W_dec"], axis=-1)
            per_tok = jnp.sum(jnp.tanh(spec.jumprelu_tanh_scale * jnp.abs(t.z) * dec_norm), -1)
            return {"sparsity": t.sparsity_coef * per_tok.mean()}
        l0_tok = jnp.sum(heaviside_ste(t.pre, self.threshold(p), spec.jumprelu_bandwidth),
                         axis=-1)  # [B]
        if mode == "step":
            return {"sparsity": t.sparsity_coef * l0_tok.mean()}
        if mode == "quadratic":  # Gemma Scope 2, per token (as SAELens implements it)
            if not spec.target_l0 or spec.target_l0 <= 0:
                raise ValueError("sae.target_l0 must be > 0 for jumprelu_sparsity=quadratic")
            target = spec.target_l0
            return {"sparsity": t.sparsity_coef * (2.0 / target * (l0_tok - target) ** 2).mean()}
        raise ValueError(f"sae.jumprelu_sparsity={mode!r}: expected step, tanh or quadratic")

    def to_saelens(self, params):
        return {**super().to_saelens(params), "threshold": np.asarray(self.threshold(params))}

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

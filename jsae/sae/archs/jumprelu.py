"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): z = pre * H(pre - theta) with a
learned per-latent threshold theta = exp(log_threshold), trained with straight-through
threshold gradients.  The sparsity term (option ``jumprelu_sparsity``; coef = ``l0_coef``):

- ``step`` (default):  coef * sum_i H(pre_i - theta_i)                      (the L0)
- ``tanh``:            coef * sum_i tanh(c |z_i| ||W_dec_i||)   (Anthropic, 2025; c =
  ``jumprelu_tanh_scale``, SAELens's ``jumprelu_tanh_scale``, default 4)
- ``quadratic``:       coef * (2 / T) (L0_t - T)^2 with L0_t a token's step L0 and
  T = ``target_l0`` (Gemma Scope 2's penalty towards a target rather than towards zero,
  in the per-token form SAELens 6 implements; it also penalises the spread of L0 over tokens)

(each averaged over tokens).

The threshold is a parameter ``log_threshold`` (``jumprelu_threshold="log"``, Gemma
Scope's and the default) or ``threshold`` (``"linear"``).  Under Adam a log parameter moves by
about lr per step in log space whatever its gradient, so from a small initial threshold it
takes thousands of steps to reach the threshold a target L0 needs (SAELens #718; measured in
tests/test_arch_jumprelu.py); a linear one moves by about lr in activation units and gets
there in hundreds.  A linear threshold is kept >= 0 after each step.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax.numpy as jnp
import numpy as np

from jsae.sae.archs import OptionError, register
from jsae.sae.archs.base import Arch
from jsae.sae.jumprelu import heaviside_ste, jumprelu_ste


class JumpReLU(Arch):
    name = "jumprelu"
    rank = 3
    coef_field = "l0_coef"
    extra_latent_axes = {"log_threshold": 0, "threshold": 0}
    saelens_name = "jumprelu"
    saelens_imports = ("jumprelu",)
    gemmascope_export = True
    gemmascope_import = "sae"

    @dataclasses.dataclass(frozen=True)
    class Options:
        l0_coef: float = 1e-3  # sparsity coefficient
        jumprelu_bandwidth: float = 1e-3  # straight-through estimator's kernel width
        jumprelu_init_threshold: float = 1e-3
        jumprelu_sparsity: Literal["step", "tanh", "quadratic"] = "step"  # the sparsity term
        jumprelu_tanh_scale: float = 4.0  # tanh: c in tanh(c |f_i| ||W_dec_i||)
        target_l0: Optional[float] = None  # quadratic: the L0 the penalty pulls towards
        # how the threshold is stored (linear reaches a target L0 in far fewer Adam steps)
        jumprelu_threshold: Literal["log", "linear"] = "log"

    def check(self, options, d_sae, d_sae_key="d_sae"):
        o = options
        for key, ok, msg in (
                ("l0_coef", o.l0_coef >= 0, "must be >= 0"),
                ("jumprelu_bandwidth", o.jumprelu_bandwidth > 0, "must be > 0"),
                ("jumprelu_init_threshold", o.jumprelu_init_threshold > 0, "must be > 0"),
                ("jumprelu_tanh_scale", o.jumprelu_tanh_scale > 0, "must be > 0"),
                ("target_l0", o.target_l0 is None or o.target_l0 > 0, "must be > 0"),
                ("target_l0", o.jumprelu_sparsity != "quadratic" or o.target_l0 is not None,
                 "is required for sae.jumprelu_sparsity: quadratic (the L0 to train towards)"),
                ("jumprelu_sparsity", o.jumprelu_sparsity in ("step", "tanh", "quadratic"),
                 f"{o.jumprelu_sparsity!r}: expected step, tanh or quadratic"),
                ("jumprelu_threshold", o.jumprelu_threshold in ("log", "linear"),
                 f"{o.jumprelu_threshold!r}: expected log or linear")):
            if not ok:
                raise OptionError(key, msg)

    def extra_params(self, spec, *, jumprelu_init_threshold: float | None = None, **opts):
        init = jumprelu_init_threshold or spec.options.jumprelu_init_threshold
        if spec.options.jumprelu_threshold == "linear":
            return {"threshold": jnp.full((spec.d_sae,), init, jnp.float32)}
        return {"log_threshold": jnp.full((spec.d_sae,), np.log(init), jnp.float32)}

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
        return jumprelu_ste(pre, self.threshold(sae.params), sae.spec.options.jumprelu_bandwidth)

    def loss_terms(self, sae, t):
        o, p = sae.spec.options, sae.params
        mode = o.jumprelu_sparsity
        if mode == "tanh":
            dec_norm = jnp.linalg.norm(p["W_dec"], axis=-1)
            per_tok = jnp.sum(jnp.tanh(o.jumprelu_tanh_scale * jnp.abs(t.z) * dec_norm), -1)
            return {"sparsity": t.sparsity_coef * per_tok.mean()}
        l0_tok = jnp.sum(heaviside_ste(t.pre, self.threshold(p), o.jumprelu_bandwidth),
                         axis=-1)  # [B]
        if mode == "step":
            return {"sparsity": t.sparsity_coef * l0_tok.mean()}
        if mode == "quadratic":  # Gemma Scope 2, per token (as SAELens implements it)
            if not o.target_l0 or o.target_l0 <= 0:
                raise ValueError("sae.target_l0 must be > 0 for jumprelu_sparsity=quadratic")
            target = o.target_l0
            return {"sparsity": t.sparsity_coef * (2.0 / target * (l0_tok - target) ** 2).mean()}
        raise ValueError(f"sae.jumprelu_sparsity={mode!r}: expected step, tanh or quadratic")

    def saelens_cfg_problem(self, cfg):
        if cfg.get("activation_fn", "relu") not in ("relu", None):
            return f"jumprelu with activation_fn={cfg['activation_fn']!r}"
        return None

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

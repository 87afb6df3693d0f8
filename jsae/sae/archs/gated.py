"""Gated SAE (Rajamanoharan et al. 2024): a hard gate H(pi_gate) from W_enc, b_enc times a
magnitude relu((x_n - b_dec)(W_enc * exp(r_mag)) + b_mag).  Loss + l1 * sum_i relu(pi_gate_i)
* ||W_dec_i|| + || x - (relu(pi_gate) sg(W_dec) + sg(b_dec)) ||^2 (the gate's aux loss)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.archs import OptionError, register
from jsae.sae.archs.base import Arch
from jsae.sae.spec import mm


class Gated(Arch):
    name = "gated"
    rank = 4
    coef_field = "l1_coef"
    extra_latent_axes = {"r_mag": 0, "b_mag": 0}
    saelens_name = "gated"
    saelens_imports = ("gated",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        l1_coef: float = 5.0  # sparsity coefficient (after normalisation)

    def check(self, options, d_sae, d_sae_key="d_sae"):
        if options.l1_coef < 0:
            raise OptionError("l1_coef", "must be >= 0")

    def extra_params(self, spec, **opts):
        return {"r_mag": jnp.zeros((spec.d_sae,), jnp.float32),
                "b_mag": jnp.zeros((spec.d_sae,), jnp.float32)}

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        p = sae.params
        gate = (pre > 0).astype(pre.dtype)  # hard gate; trained through the aux loss
        mag = mm(x_n - p["b_dec"], p["W_enc"] * jnp.exp(p["r_mag"]), sae.spec.compute_dtype)
        return gate * jax.nn.relu(mag + p["b_mag"])

    def loss_terms(self, sae, t):
        p = sae.params
        gate_act = jax.nn.relu(t.pre)
        dec_norm = jnp.linalg.norm(p["W_dec"], axis=-1)
        frozen = mm(gate_act, jax.lax.stop_gradient(p["W_dec"]), sae.spec.compute_dtype)
        frozen = frozen + jax.lax.stop_gradient(p["b_dec"])
        return {"sparsity": t.sparsity_coef * jnp.sum(gate_act * dec_norm, axis=-1).mean(),
                "gate_aux": jnp.sum((frozen - t.x_target) ** 2, axis=-1).mean()}

    def to_saelens(self, params):
        return {"W_enc": params["W_enc"], "W_dec": params["W_dec"], "b_dec": params["b_dec"],
                "b_gate": params["b_enc"], "r_mag": params["r_mag"], "b_mag": params["b_mag"]}

    def saelens_required(self, saelens_arch):
        return ("b_gate", "r_mag", "b_mag")

    def from_saelens(self, saelens_arch, t, shift, source):
        w_mag = t["W_enc"].astype(np.float64) * np.exp(t["r_mag"].astype(np.float64))
        return {"b_enc": t["b_gate"] + shift(t["W_enc"]), "r_mag": t["r_mag"],
                "b_mag": t["b_mag"] + shift(w_mag)}


register(Gated())

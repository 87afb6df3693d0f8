"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

Codes are BatchTopK's (the k * B largest relu(pre) of the batch; a learned inference
threshold).  The latents are ordered in nested prefixes ``n_1 < n_2 < ... < n_M = d_sae``
(``spec.matryoshka_groups``); each prefix alone reconstructs the input:

    loss = sum_m w_m || x - (z[:, :n_m] W_dec[:n_m] + b_dec) ||^2  (+ aux_coef * AuxK)

with ``w = spec.matryoshka_weights`` (default all 1).  The terms: ``recon`` = w_M times the
full reconstruction, ``matryoshka`` = the inner prefixes' weighted sum.  Early latents are
pushed to carry general features that later ones refine, which curbs feature absorption.
Exports to SAELens as a JumpReLU SAE (as SAELens saves its matryoshka_batchtopk for inference).
"""

from __future__ import annotations

import jax.numpy as jnp

from jsae.sae.archs import register
from jsae.sae.archs.batchtopk import BatchTopK


def prefixes(spec) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(prefix sizes ending at d_sae, one weight each) of ``spec``, checked."""
    groups = tuple(int(g) for g in spec.matryoshka_groups) or (spec.d_sae,)
    if groups[-1] != spec.d_sae:
        groups = (*groups, spec.d_sae)
    if any(b <= a for a, b in zip(groups, groups[1:])) or groups[0] <= 0:
        raise ValueError(f"sae.matryoshka_groups={list(spec.matryoshka_groups)} must be "
                         f"ascending positive prefix sizes up to d_sae={spec.d_sae}")
    weights = tuple(float(w) for w in spec.matryoshka_weights) or (1.0,) * len(groups)
    if len(weights) != len(groups):
        raise ValueError(f"sae.matryoshka_weights has {len(weights)} entries but there are "
                         f"{len(groups)} prefixes {list(groups)}")
    return groups, weights


class Matryoshka(BatchTopK):
    name = "matryoshka"

    def check_spec(self, spec):
        prefixes(spec)

    def recon_loss(self, sae, x_hat, x_target):
        return prefixes(sae.spec)[1][-1] * super().recon_loss(sae, x_hat, x_target)

    def loss_terms(self, sae, t):
        from jsae.sae.core import _mm

        p = sae.params
        ids = jnp.arange(sae.spec.d_sae)

        def decode_prefix(n):  # masked, not sliced: keeps the latent axis shardable
            z = jnp.where(ids < n, t.z, 0.0)
            return _mm(z, p["W_dec"], sae.spec.compute_dtype) + p["b_dec"]

        return {"matryoshka": inner_loss(sae.spec, decode_prefix, t.x_target),
                **super().loss_terms(sae, t)}

    def fast_extra_terms(self, sae, codes, x_target):
        from jsae.sae import fast

        p = sae.params

        def decode_prefix(n):
            masked = codes.replace(vals=jnp.where(codes.cols < n, codes.vals, 0.0))
            return fast.sparse_decode(masked, p["W_dec"]) + p["b_dec"]

        return {"matryoshka": inner_loss(sae.spec, decode_prefix, x_target)}


def inner_loss(spec, decode_prefix, x_target):
    """sum over the inner prefixes m < M of w_m ||x - decode_prefix(n_m)||^2 (token mean)."""
    groups, weights = prefixes(spec)
    total = jnp.zeros((), jnp.float32)
    for n, w in zip(groups[:-1], weights[:-1]):
        total = total + w * jnp.sum((decode_prefix(n) - x_target) ** 2, axis=-1).mean()
    return total


register(Matryoshka())

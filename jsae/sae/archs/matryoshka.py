"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

Codes are BatchTopK's (the k * B largest relu(pre) of the batch; a learned inference
threshold).  The latents are ordered in nested prefixes ``n_1 < n_2 < ... < n_M = d_sae``
(option ``matryoshka_groups``); each prefix alone reconstructs the input:

    loss = sum_m w_m || x - (z[:, :n_m] W_dec[:n_m] + b_dec) ||^2  (+ aux_coef * AuxK)

with ``w`` = option ``matryoshka_weights`` (default all 1).  The terms: ``recon`` = w_M times the
full reconstruction, ``matryoshka`` = the inner prefixes' weighted sum.  Early latents are
pushed to carry general features that later ones refine, which curbs feature absorption.
Exports to SAELens as a JumpReLU SAE (as SAELens saves its matryoshka_batchtopk for inference).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jsae.sae.archs import OptionError, register
from jsae.sae.archs.batchtopk import BatchTopK
from jsae.sae.archs.topk import check_k
from jsae.sae.spec import mm


def _prefixes(options, d_sae: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    groups = tuple(int(g) for g in options.matryoshka_groups) or (d_sae,)
    if any(b <= a for a, b in zip(groups, groups[1:])) or groups[0] <= 0:
        raise OptionError("matryoshka_groups", f"{list(groups)} must be ascending positive "
                          "prefix sizes")
    if groups[-1] > d_sae:
        raise OptionError("matryoshka_groups", f"the last prefix {groups[-1]} exceeds "
                          f"d_sae={d_sae}")
    if groups[-1] != d_sae:
        groups = (*groups, d_sae)
    weights = tuple(float(w) for w in options.matryoshka_weights) or (1.0,) * len(groups)
    if len(weights) != len(groups):
        raise OptionError("matryoshka_weights", f"has {len(weights)} entries but there are "
                          f"{len(groups)} prefixes {list(groups)} (one weight per prefix)")
    if any(w < 0 for w in weights):
        raise OptionError("matryoshka_weights", "must be >= 0")
    return groups, weights


def prefixes(spec) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(prefix sizes ending at d_sae, one weight each) of ``spec``, checked."""
    return _prefixes(spec.options, spec.d_sae)


class Matryoshka(BatchTopK):
    name = "matryoshka"
    rank = 5

    @dataclasses.dataclass(frozen=True)
    class Options:
        k: int = 32  # mean active latents per token (k * B per batch)
        matryoshka_groups: tuple[int, ...] = ()  # ascending prefix sizes (d_sae appended)
        matryoshka_weights: tuple[float, ...] = ()  # one loss weight per prefix (default 1)

    def check(self, options, d_sae, d_sae_key="d_sae"):
        check_k(options.k, d_sae, d_sae_key)
        if d_sae is not None:
            _prefixes(options, d_sae)
        elif any(b <= a for a, b in zip(options.matryoshka_groups,
                                        options.matryoshka_groups[1:])):
            raise OptionError("matryoshka_groups", f"{list(options.matryoshka_groups)} must "
                              "be ascending positive prefix sizes")

    def recon_loss(self, sae, x_hat, x_target):
        return prefixes(sae.spec)[1][-1] * super().recon_loss(sae, x_hat, x_target)

    def loss_terms(self, sae, t):
        p = sae.params
        ids = jnp.arange(sae.spec.d_sae)

        def decode_prefix(n):  # masked, not sliced: keeps the latent axis shardable
            z = jnp.where(ids < n, t.z, 0.0)
            return mm(z, p["W_dec"], sae.spec.compute_dtype) + p["b_dec"]

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

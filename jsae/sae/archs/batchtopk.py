"""BatchTopK SAE (Bussmann et al. 2024): training keeps the k * B largest relu(pre) of the
batch; inference is a JumpReLU at a threshold set by an EMA of the batch's smallest active
code (dictionary_learning, SAELens), not by gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae import selection
from jsae.sae.archs import register
from jsae.sae.archs.base import Arch
from jsae.sae.archs.topk import TopK, auxk_terms

# The inference threshold follows the batches' smallest active codes with an EMA whose horizon is
# a tenth of the updates so far, capped at SAELens's 100 (topk_threshold_lr = 0.01). Codes shrink
# while a dictionary trains, so any average over the whole run lags: in a 146-step run a running
# mean of all batches kept 0.56 while the last batches' minima were 0.37 (held-out L0 19 for
# k = 32; a plain 0.99 EMA seeded by batch 1 gave 17, dictionary_learning's 0.999 gave 10.5).
THRESHOLD_EMA = 0.99
THRESHOLD_HORIZON = 0.1  # the EMA's horizon as a fraction of the updates so far


def threshold_rate(step):
    """The EMA's rate after ``step`` earlier updates: 1 / (1 + step / 10), at least 0.01."""
    return jnp.maximum(1.0 - THRESHOLD_EMA,
                       1.0 / (1.0 + THRESHOLD_HORIZON * jnp.asarray(step, jnp.float32)))


def ema_threshold(old, z, step=None):
    """The threshold after a batch with codes ``z`` and ``step`` earlier updates (see
    `threshold_rate`; without ``step``, SAELens's EMA). ``old < 0`` (untrained) seeds it."""
    from jsae.sae import fast

    min_act = fast.min_positive(z)
    min_act = jnp.where(jnp.isfinite(min_act), min_act, 0.0)
    rate = 1.0 - THRESHOLD_EMA if step is None else threshold_rate(step)
    return jnp.where(old < 0, min_act, (1.0 - rate) * old + rate * min_act)


class BatchTopK(Arch):
    name = "batchtopk"
    rank = 2
    Options = TopK.Options
    check = TopK.check
    code_k = TopK.code_k
    extra_latent_axes = {"threshold": 0}
    frozen_params = ("threshold",)
    supports_fast = True
    saelens_name = "jumprelu"
    gemmascope_export = True

    def extra_params(self, spec, **opts):
        return {"threshold": jnp.full((spec.d_sae,), -1.0, jnp.float32)}  # set by batch 1

    def threshold(self, params):
        return params["threshold"]

    def activate(self, sae, pre, x_n, *, train=False, topk_fn=None, batch_topk_fn=None):
        if train:
            return (batch_topk_fn or selection.batch_topk)(jax.nn.relu(pre), sae.spec.options.k)
        return jnp.where(pre > sae.params["threshold"], pre, 0.0)

    def loss_terms(self, sae, t):
        return auxk_terms(sae, t)

    def after_update(self, params, z, step=None):
        return {**params, "threshold": ema_threshold(params["threshold"], z, step)}

    def fast_applies(self, batch_topk_fn) -> bool:
        # not with the sharded batch-wide selection: the flat top-k would gather the batch
        return batch_topk_fn is None

    def fast_codes(self, sae, pre):
        from jsae.sae import fast

        return fast.batch_topk_codes(pre, sae.spec.options.k)  # values already relu(pre): same grad

    def to_saelens(self, params):
        t = super().to_saelens(params)
        # SAELens's jumprelu is relu(pre) * (pre > threshold); jsae's batchtopk inference is
        # pre * (pre > threshold). They agree for threshold >= 0 (a trained threshold is the
        # smallest positive activation; an untrained one is -1).
        t["threshold"] = np.maximum(params["threshold"], 0.0)
        return t


register(BatchTopK())

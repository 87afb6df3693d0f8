"""Logit effects: which tokens a feature's decoder direction promotes or suppresses directly.

``effect[f] = (W_dec[f] / norm_scale * final_norm_scale) @ W_U``: the feature's raw-activation
direction, through the final norm's elementwise scale (the part of the norm that is linear,
as TransformerLens folds it into ``W_U``) and the unembedding. The RMS normalisation itself is
left out, so effects are comparable across features but not calibrated logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jsae.sae.core import SAE


@dataclasses.dataclass
class LogitEffects:
    """Rows follow ``features``: ``top_ids/top_values [F, k]`` most promoted tokens (descending),
    ``bottom_ids/bottom_values [F, k]`` most suppressed (ascending)."""

    features: np.ndarray
    top_ids: np.ndarray
    top_values: np.ndarray
    bottom_ids: np.ndarray
    bottom_values: np.ndarray

    def row(self, feature: int) -> int:
        hits = np.flatnonzero(self.features == int(feature))
        if not len(hits):
            raise KeyError(f"feature {feature} was not analysed")
        return int(hits[0])


def _scaled(model, dirs) -> jax.Array:
    """Directions times the final norm's elementwise scale (``[..., d_model]``)."""
    return jnp.asarray(dirs, jnp.float32) * model.params["final_norm"]["scale"].astype(jnp.float32)


def _unembed(model, x) -> jax.Array:
    """``x [..., d_model] @ W_U`` without materialising a transposed copy of a tied embedding."""
    p = model.params
    if model.cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", x, p["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", x, p["unembed"], preferred_element_type=jnp.float32)


def feature_directions(sae: SAE, features) -> jax.Array:
    """Raw-activation decoder directions ``[F, d_model]`` (``W_dec[f] / norm_scale``; a
    crosscoder's rows at its last hook)."""
    from jsae.sae.archs import get_arch

    rows = get_arch(sae.spec.architecture).decoder_directions(
        sae.params, jnp.asarray(features, jnp.int32))
    return rows / sae.norm_scale


@partial(jax.jit, static_argnames=("model_cfg", "k"))
def _chunk_effects(model_cfg, params, dirs, vocab, *, k):
    model = _Model(model_cfg, params)
    logits = _unembed(model, _scaled(model, dirs))  # [F, V]
    if vocab is not None:
        logits = jnp.take(logits, vocab, axis=1)
    tv, ti = jax.lax.top_k(logits, k)
    bv, bi = jax.lax.top_k(-logits, k)
    if vocab is not None:
        ti, bi = vocab[ti], vocab[bi]
    return tv, ti, -bv, bi


@dataclasses.dataclass(frozen=True)
class _Model:
    cfg: object
    params: dict


def logit_effects(model, sae: SAE, features: Sequence[int] | int, k: int = 10, *,
                  vocab: Sequence[int] | None = None, chunk: int = 256) -> LogitEffects:
    """Top-``k`` promoted and suppressed tokens of each feature's decoder direction.

    ``vocab``: rank only these token ids (e.g. the tokens seen in a corpus, which keeps the
    rare tokens of a 262k vocabulary, whose unembeddings are poorly trained, out of the lists)."""
    feats = np.atleast_1d(np.asarray(features, np.int64))
    voc = None if vocab is None else jnp.asarray(np.unique(np.asarray(vocab, np.int64)), jnp.int32)
    if voc is not None and voc.shape[0] < k:
        raise ValueError(f"vocab has {voc.shape[0]} tokens; need at least k={k}")
    params = {"embed" if model.cfg.tie_embeddings else "unembed":
              model.params["embed" if model.cfg.tie_embeddings else "unembed"],
              "final_norm": model.params["final_norm"]}
    out = [[], [], [], []]
    for s in range(0, len(feats), chunk):
        part = feats[s : s + chunk]
        res = _chunk_effects(model.cfg, params, feature_directions(sae, part), voc, k=int(k))
        for lst, a in zip(out, res):
            lst.append(np.asarray(a))
    tv, ti, bv, bi = (np.concatenate(x) for x in out)
    return LogitEffects(feats, ti.astype(np.int64), tv, bi.astype(np.int64), bv)


def direction_logits(model, direction) -> jax.Array:
    """Logit effect ``[vocab]`` of any raw-activation direction ``[d_model]``."""
    return _unembed(model, _scaled(model, direction))

"""Top-activating contexts per feature, streamed over a corpus of token contexts.

For every feature the running state keeps the ``top_n`` contexts where its maximum code is
largest (one entry per context: the position of that maximum), merged batch by batch with
``jax.lax.top_k`` on the device, plus the firing frequency and mean code over all counted
tokens. Memory is ``O(n_features * top_n)`` whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae.fileio import atomic_file
from jsae.sae.core import SAE, encode

Array = jax.Array


@dataclasses.dataclass
class TopActivations:
    """Per feature (rows follow ``features``), the contexts where it fired most.

    ``values [F, top_n]`` max code of the feature in the context (descending; 0 = no entry),
    ``context [F, top_n]`` row in the corpus (``-1`` where the feature fired in fewer contexts),
    ``position [F, top_n]`` token position of that maximum, ``frequency [F]`` fraction of counted
    tokens where the code is > 0, ``mean [F]`` mean code over counted tokens, ``n_tokens``.
    """

    features: np.ndarray
    values: np.ndarray
    context: np.ndarray
    position: np.ndarray
    frequency: np.ndarray
    mean: np.ndarray
    n_tokens: int

    def row(self, feature: int) -> int:
        """Row of a feature id in the arrays."""
        hits = np.flatnonzero(self.features == int(feature))
        if not len(hits):
            raise KeyError(f"feature {feature} was not analysed")
        return int(hits[0])

    def examples(self, feature: int) -> list[tuple[int, int, float]]:
        """``[(context, position, value), ...]`` for a feature, best first, real entries only."""
        r = self.row(feature)
        return [(int(c), int(p), float(v)) for c, p, v in
                zip(self.context[r], self.position[r], self.values[r]) if c >= 0 and v > 0]

    @property
    def max(self) -> np.ndarray:
        """Largest code seen per feature ``[F]``."""
        return self.values[:, 0]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}
        with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no .npz
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> TopActivations:
        """Read what :meth:`save` wrote, every array checked (kind, shape against ``features``
        and each other, finite values): a damaged file is a one-line `FileFormatError`."""
        from jsae.errors import FileFormatError
        from jsae.validate import bad, finite_array

        path = Path(path)
        names = [f.name for f in dataclasses.fields(cls)]
        try:
            with np.load(path, allow_pickle=False) as d:
                if not hasattr(d, "files"):
                    raise bad(path, "", "is not an .npz archive of top activations")
                missing = [n for n in names if n not in d.files]
                if missing:
                    raise bad(path, "", f"lacks the arrays {missing}: not a top-activations file")
                kw = {n: d[n] for n in names}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            if isinstance(e, FileFormatError):
                raise
            raise FileFormatError(f"{path} is not a readable top-activations file "
                                  f"({type(e).__name__}: {e}); delete it to recompute it") from e
        F = finite_array(kw["features"], "array 'features'", path, shape=(None,), kind="i").shape[0]
        top_n = finite_array(kw["values"], "array 'values'", path, shape=(F, None)).shape[1]
        finite_array(kw["context"], "array 'context'", path, shape=(F, top_n), kind="i")
        finite_array(kw["position"], "array 'position'", path, shape=(F, top_n), kind="i")
        for n in ("frequency", "mean"):
            finite_array(kw[n], f"array {n!r}", path, shape=(F,))
        finite_array(kw["n_tokens"], "array 'n_tokens'", path, shape=(), kind="i")
        kw["n_tokens"] = int(kw["n_tokens"])
        if kw["n_tokens"] < 0 or (kw["features"] < 0).any() or (kw["context"] < -1).any():
            raise bad(path, "", "holds negative counts or ids; delete it to recompute it")
        return cls(**kw)


def _codes(sae: SAE, acts: Array, features: Array | None) -> Array:
    if features is None:
        return encode(sae, acts)
    from jsae.steering import feature_codes

    return feature_codes(sae, acts, features)


@partial(jax.jit, static_argnames=("top_n",))
def _batch_stats(sae, acts, mask, features, offset, state, *, top_n):
    """Merge one batch (acts [B, T, D], mask [B, T]) into the running state."""
    z = _codes(sae, acts, features)  # [B, T, F]
    m = mask[..., None]
    z = jnp.where(m, z, 0.0)
    fires = jnp.sum((z > 0) & m, axis=(0, 1))
    total = jnp.sum(z, axis=(0, 1))
    ctx_max = z.max(axis=1).T  # [F, B]
    ctx_pos = z.argmax(axis=1).T.astype(jnp.int32)  # [F, B]
    ctx_id = jnp.broadcast_to(offset + jnp.arange(z.shape[0], dtype=jnp.int32), ctx_max.shape)
    vals = jnp.concatenate([state["values"], ctx_max], axis=1)
    ids = jnp.concatenate([state["context"], ctx_id], axis=1)
    pos = jnp.concatenate([state["position"], ctx_pos], axis=1)
    v, i = jax.lax.top_k(vals, top_n)
    return {
        "values": v,
        "context": jnp.take_along_axis(ids, i, axis=1),
        "position": jnp.take_along_axis(pos, i, axis=1),
        "fires": state["fires"] + fires,
        "total": state["total"] + total,
    }


def default_mask(model, contexts: np.ndarray) -> np.ndarray:
    """Every position except BOS and padding."""
    cfg = model.cfg
    tok = getattr(model, "tokenizer", None)
    special = {getattr(tok, "bos_id", None), getattr(tok, "pad_id", None), cfg.bos_id, cfg.pad_id}
    special.discard(None)
    return ~np.isin(contexts, list(special))


def hook_activations(model, hook: str, tokens, attention_mask=None, forward: Callable | None = None) -> Array:
    """Activations ``[B, T, d_model]`` at ``hook``, the forward stopped right after it (a
    crosscoder's key ``a+b+c``: its hooks stacked ``[B, T, L, d_model]``)."""
    from jsae.runs import input_hooks, stack_hooks

    if forward is None:
        from jsae.models.transformer import forward
    out = forward(model.cfg, model.params, jnp.asarray(tokens, jnp.int32),
                  capture=tuple(input_hooks(hook)), stop_after_capture=True,
                  attention_mask=attention_mask)
    return stack_hooks(out.activations, hook, jnp)


def top_activations(
    model,
    sae: SAE,
    hook: str,
    contexts: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    features: Sequence[int] | None = None,
    n_features: int | None = None,
    top_n: int = 10,
    batch_size: int = 8,
    forward: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TopActivations:
    """The ``top_n`` contexts (rows of ``contexts [N, T]``) where each feature fires most.

    ``model``: a ``jsae.models`` LanguageModel (``.cfg``, ``.params``; the tokenizer is only used
    for the default mask). ``mask [N, T]``: positions that count (default: all but BOS/padding).
    ``features``: ids to analyse (default all; ``n_features``: the first n). Contexts are run
    ``batch_size`` at a time through the model, stopped after ``hook``.
    """
    contexts = np.asarray(contexts, np.int32)
    if contexts.ndim != 2:
        raise ValueError(f"contexts must be [N, T] token ids; got shape {contexts.shape}")
    mask = default_mask(model, contexts) if mask is None else np.asarray(mask, bool)
    if mask.shape != contexts.shape:
        raise ValueError(f"mask shape {mask.shape} != contexts shape {contexts.shape}")
    if features is None:
        n = sae.spec.d_sae if n_features is None else min(int(n_features), sae.spec.d_sae)
        feat_ids = np.arange(n)
        feats = None if n == sae.spec.d_sae else jnp.asarray(feat_ids, jnp.int32)
    else:
        feat_ids = np.asarray(features, np.int64).reshape(-1)
        feats = jnp.asarray(feat_ids, jnp.int32)
    F, N = len(feat_ids), contexts.shape[0]
    top_n = int(top_n)
    state = {
        "values": jnp.zeros((F, top_n), jnp.float32),
        "context": jnp.full((F, top_n), -1, jnp.int32),
        "position": jnp.zeros((F, top_n), jnp.int32),
        "fires": jnp.zeros((F,), jnp.int32),
        "total": jnp.zeros((F,), jnp.float32),
    }
    for start in range(0, N, batch_size):
        tok = contexts[start : start + batch_size]
        msk = mask[start : start + batch_size]
        if tok.shape[0] < batch_size:  # keep one compiled shape: pad with masked-out rows
            pad = batch_size - tok.shape[0]
            tok = np.concatenate([tok, np.repeat(tok[-1:], pad, 0)])
            msk = np.concatenate([msk, np.zeros((pad, msk.shape[1]), bool)])
        acts = hook_activations(model, hook, tok, forward=forward)
        state = _batch_stats(sae, acts, jnp.asarray(msk), feats, jnp.int32(start), state, top_n=top_n)
        if progress:
            progress(min(start + batch_size, N), N)
    s = jax.device_get(state)
    n_tokens = int(mask.sum())
    values = np.asarray(s["values"], np.float32)
    context = np.where(values > 0, s["context"], -1).astype(np.int64)
    return TopActivations(
        features=feat_ids,
        values=values,
        context=context,
        position=np.asarray(s["position"], np.int64),
        frequency=np.asarray(s["fires"], np.float64) / max(n_tokens, 1),
        mean=np.asarray(s["total"], np.float64) / max(n_tokens, 1),
        n_tokens=n_tokens,
    )

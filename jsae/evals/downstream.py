"""Downstream metrics: the model's next-token loss with a dictionary spliced in at its hook.

For a batch of contexts ``tokens [B, T]`` and a boolean ``mask [B, T]`` (True at the positions
an SAE trains on: real tokens, not padding, not BOS when ``data.exclude_bos``), one jitted
program runs the LM ``1 + 4H`` times for ``H`` hooks, as a ``lax.scan`` over variants so the
forward compiles once:

- ``clean``: the model unchanged;
- for each hook ``h``: ``sae`` (the activation at ``h`` replaced by ``decode(encode(x))``),
  ``zero`` (replaced by 0) and ``mean`` (replaced by the mean activation over the evaluated
  tokens), each only at masked positions; elsewhere (BOS, padding) the activation is kept, as
  SAEBench does with ``exclude_special_tokens_from_reconstruction``; and ``zero_all``, the
  activation zeroed at *every* position, BOS included: the zero-ablation baseline of SAELens'
  and SAEBench's ``ce_loss_score`` / ``kl_div_score`` (``standard_zero_ablate_hook``).

A transcoder (``targets[key]``: the hook it reconstructs, another than its input hook ``key``)
is spliced in place of what it models: the activation at ``targets[key]`` (e.g.
``hook_mlp_out``) is replaced by the transcoder's prediction from ``key`` (``hook_resid_mid``)
of the same forward, and the ablations zero / mean-ablate ``targets[key]``.

Per variant it returns the per-token cross-entropy of the next token and the per-token
``KL(p_clean || p_variant)``. CE counts position ``t`` (predicting token ``t + 1``) when both
``mask[t]`` and ``mask[t + 1]``; KL counts every masked position. The ratios are computed
from exact totals by :class:`DownstreamStats` (formulas in ``docs/metrics.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jsae.models.transformer import ReadsHook
from jsae.sae.core import SAE, reconstruct

VARIANTS = ("sae", "zero", "mean", "zero_all")  # per hook, after the clean run
NV = len(VARIANTS)


def _replace(sae: SAE, m: jax.Array, s: jax.Array, c: jax.Array, act: jax.Array) -> jax.Array:
    """``act`` with masked positions set to ``s * sae(act) + (1 - s) * c`` (s is 0 or 1)."""
    x = act.astype(jnp.float32)
    new = s * reconstruct(sae, x) + (1.0 - s) * c.astype(jnp.float32)
    return jnp.where(m[..., None], new, x).astype(act.dtype)


def _replace_reading(sae: SAE, m: jax.Array, s: jax.Array, c: jax.Array, act: jax.Array,
                     src: jax.Array) -> jax.Array:
    """``act`` with masked positions set to ``s * transcoder(src) + (1 - s) * c``."""
    new = s * reconstruct(sae, src.astype(jnp.float32)) + (1.0 - s) * c.astype(jnp.float32)
    return jnp.where(m[..., None], new, act.astype(jnp.float32)).astype(act.dtype)


def splice_intervention(sae: SAE, mask=None) -> Callable:
    """An intervention ``act -> decode(encode(act))`` (at ``mask [B, T]`` positions only, if
    given) for ``forward(..., interventions={hook: fn})``. A ``jax.tree_util.Partial``, so
    a new SAE with the same shapes does not recompile the forward."""
    if mask is None:
        return jax.tree_util.Partial(_splice_all, sae)
    return jax.tree_util.Partial(
        _replace, sae, jnp.asarray(mask, bool), jnp.float32(1.0), jnp.zeros((), jnp.float32)
    )


def _splice_all(sae: SAE, act: jax.Array) -> jax.Array:
    return reconstruct(sae, act.astype(jnp.float32)).astype(act.dtype)


def variant_plan(hooks: Sequence[str], means: Mapping[str, np.ndarray]):
    """Per-variant arrays for the scan: ``s [V, H]``, ``use [V, H]``, ``const [V, H, D]``,
    ``everywhere [V, H]`` (replace at every position, not only the masked ones).

    Variant 0 is clean; variant ``1 + NV*i + j`` is ``VARIANTS[j]`` at hook ``i``."""
    H = len(hooks)
    D = len(np.asarray(means[hooks[0]]))
    V = 1 + NV * H
    s = np.zeros((V, H), np.float32)
    use = np.zeros((V, H), bool)
    const = np.zeros((V, H, D), np.float32)
    everywhere = np.zeros((V, H), bool)
    for i, h in enumerate(hooks):
        base = 1 + NV * i
        s[base, i] = 1.0
        use[base : base + NV, i] = True
        const[base + 2, i] = np.asarray(means[h], np.float32)
        everywhere[base + 3, i] = True
    return s, use, const, everywhere


@partial(jax.jit, static_argnames=("forward", "model_cfg", "hooks", "targets"))
def variant_losses(
    params,
    tokens: jax.Array,
    mask: jax.Array,
    attention_mask: jax.Array | None,
    saes: dict,
    s: jax.Array,
    use: jax.Array,
    const: jax.Array,
    everywhere: jax.Array | None = None,
    *,
    forward: Callable,
    model_cfg,
    hooks: tuple,
    targets: tuple | None = None,
):
    """``(ce [V, B, T-1], kl [V, B, T])`` for the variants of :func:`variant_plan`.

    ``targets[i]``: the hook ``hooks[i]``'s dictionary replaces (a transcoder's output hook;
    default ``hooks[i]``)."""
    replaced = hooks if targets is None else targets
    tokens = tokens.astype(jnp.int32)
    mask = mask.astype(bool)
    if everywhere is None:
        everywhere = jnp.zeros(use.shape, bool)

    def logits_of(fns):
        out = forward(model_cfg, params, tokens, interventions=fns, attention_mask=attention_mask)
        return out.logits

    shape = jax.eval_shape(lambda: logits_of(None)).shape
    targets = tokens[:, 1:]

    def body(lp_clean, xs):
        s_v, use_v, c_v, all_v, first = xs
        fns = {}
        for i, (h, t) in enumerate(zip(hooks, replaced)):
            where = (mask | all_v[i]) & use_v[i]
            if t == h:
                fns[h] = jax.tree_util.Partial(_replace, saes[h], where, s_v[i], c_v[i])
            else:
                fns[t] = ReadsHook(h, jax.tree_util.Partial(
                    _replace_reading, saes[h], where, s_v[i], c_v[i]))
        lp = jax.nn.log_softmax(logits_of(fns).astype(jnp.float32), axis=-1)
        lp_clean = jnp.where(first, lp, lp_clean)
        ce = -jnp.take_along_axis(lp[:, :-1], targets[..., None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(lp_clean) * (lp_clean - lp), axis=-1)
        return lp_clean, (ce, kl)

    first = jnp.arange(s.shape[0]) == 0
    init = jnp.zeros(shape, jnp.float32)
    _, (ce, kl) = jax.lax.scan(body, init, (s, use, const, everywhere.astype(bool), first))
    return ce, kl


class DownstreamStats:
    """Exact totals of CE and KL per variant over many batches; ``result()`` per hook."""

    def __init__(self, hooks: Sequence[str]):
        self.hooks = list(hooks)
        V = 1 + NV * len(self.hooks)
        self.ce = np.zeros(V)
        self.kl = np.zeros(V)
        self.ce_sl = np.zeros(V)  # SAELens' CE positions (see `add`)
        self.n_ce = 0
        self.n_kl = 0
        self.n_ce_sl = 0

    def add(self, ce: np.ndarray, kl: np.ndarray, mask: np.ndarray) -> None:
        mask = np.asarray(mask, bool)
        ce_mask = mask[:, :-1] & mask[:, 1:]
        # SAELens counts position t whenever token t is not ignored, also when the target is a
        # document-separating BOS; padding (after a row's last real token) is never a target.
        T = mask.shape[1]
        last = np.where(mask.any(1), T - 1 - np.argmax(mask[:, ::-1], axis=1), -1)
        sl_mask = mask[:, :-1] & (np.arange(1, T)[None, :] <= last[:, None])
        ce = np.asarray(ce, np.float64)
        kl = np.asarray(kl, np.float64)
        self.ce += np.sum(ce * ce_mask, axis=(1, 2))
        self.ce_sl += np.sum(ce * sl_mask, axis=(1, 2))
        self.kl += np.sum(kl * mask, axis=(1, 2))
        self.n_ce += int(ce_mask.sum())
        self.n_ce_sl += int(sl_mask.sum())
        self.n_kl += int(mask.sum())

    def merge_processes(self) -> None:
        """Sum the totals of every process (a collective: every process calls it)."""
        if jax.process_count() == 1:
            return
        from jsae.parallel import process_sum

        total = process_sum(np.concatenate([self.ce, self.kl, self.ce_sl,
                                            [self.n_ce, self.n_kl, self.n_ce_sl]]))
        v = len(self.ce)
        self.ce, self.kl, self.ce_sl = total[:v], total[v:2 * v], total[2 * v:3 * v]
        self.n_ce, self.n_kl = int(round(total[-3])), int(round(total[-2]))
        self.n_ce_sl = int(round(total[-1]))

    def result(self) -> dict[str, dict[str, float]]:
        if self.n_ce == 0:
            raise ValueError("no token positions were evaluated for the downstream loss")
        ce = self.ce / self.n_ce
        kl = self.kl / self.n_kl
        sl = self.ce_sl / max(self.n_ce_sl, 1)
        out = {}
        for i, h in enumerate(self.hooks):
            b = 1 + NV * i
            clean, spliced, zero, mean = ce[0], ce[b], ce[b + 1], ce[b + 2]
            out[h] = {
                "ce_clean": float(clean),
                "ce_spliced": float(spliced),
                "ce_zero_abl": float(zero),
                "ce_mean_abl": float(mean),
                "ce_delta": float(spliced - clean),
                "ce_recovered_zero": _ratio(zero - spliced, zero - clean),
                "ce_recovered_mean": _ratio(mean - spliced, mean - clean),
                "kl_spliced": float(kl[b]),
                "kl_zero_abl": float(kl[b + 1]),
                "kl_mean_abl": float(kl[b + 2]),
                "kl_score_zero": _ratio(kl[b + 1] - kl[b], kl[b + 1]),
                "kl_score_mean": _ratio(kl[b + 2] - kl[b], kl[b + 2]),
                # SAELens / SAEBench: the zero-ablation baseline zeroes every position, and
                # CE counts SAELens' positions (targets that are BOS separators included).
                "ce_clean_saelens": float(sl[0]),
                "ce_spliced_saelens": float(sl[b]),
                "ce_zero_abl_all": float(sl[b + 3]),
                "kl_zero_abl_all": float(kl[b + 3]),
                "ce_loss_score": _ratio(sl[b + 3] - sl[b], sl[b + 3] - sl[0]),
                "kl_div_score": _ratio(kl[b + 3] - kl[b], kl[b + 3]),
                "ce_tokens": float(self.n_ce),
                "kl_tokens": float(self.n_kl),
            }
        return out


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b != 0 else float("nan")


def downstream_metrics(
    model,
    saes: Mapping[str, SAE],
    batches,
    means: Mapping[str, np.ndarray],
    *,
    forward: Callable | None = None,
    targets: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """CE / KL metrics per hook over ``batches`` of ``(tokens [B, T], mask [B, T])``.

    ``means[hook]`` is the mean activation used for mean ablation (over the same tokens) of
    what ``hook``'s dictionary replaces; ``targets[hook]``: that hook for a transcoder.
    ``model`` has ``.cfg`` and ``.params``; ``forward`` defaults to ``jsae.models.forward``.
    """
    if forward is None:
        from jsae.models import forward
    hooks = tuple(saes)
    tgt = tuple((targets or {}).get(h, h) for h in hooks)
    if len(set(tgt)) < len(tgt):
        raise ValueError(f"two dictionaries replace the same hook: {dict(zip(hooks, tgt))}")
    s, use, const, everywhere = variant_plan(hooks, means)
    stats = DownstreamStats(hooks)
    for tokens, mask in batches:
        ce, kl = variant_losses(
            model.params, jnp.asarray(tokens), jnp.asarray(mask), None, dict(saes),
            jnp.asarray(s), jnp.asarray(use), jnp.asarray(const), jnp.asarray(everywhere),
            forward=forward, model_cfg=model.cfg, hooks=hooks, targets=tgt,
        )
        stats.add(jax.device_get(ce), jax.device_get(kl), mask)
    stats.merge_processes()  # multi-host: every process evaluated its share
    return stats.result()

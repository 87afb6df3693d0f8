"""Checking a graph on the real model: set features to values and see the logits move.

`intervene` runs the real (unfrozen) model with each chosen feature's code set to a value, as
circuit-tracer's ``feature_intervention(..., freeze_attention=False)`` does: at every layer the
feature writes, its decoder times (value - its current code, recomputed from that forward's own
MLP input) is added to the MLP output, so the change propagates through attention, norms and
later MLPs. The MLPs themselves stay the real ones (the transcoders only say what to add).
Position 0 (the BOS) has no features, as in attribution: setting one there adds value x decoder.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jsae.circuits import dictionaries as dicts
from jsae.circuits.attribution import prompt_tokens
from jsae.errors import BadInput
from jsae.models.transformer import ReadsHook, forward


def _check(dic: dicts.Dictionaries, T: int, settings) -> dict[int, list]:
    by_layer: dict[int, list] = {}
    for key, value in settings.items():
        try:
            layer, feature, pos = (int(v) for v in key)
        except (TypeError, ValueError):
            raise BadInput(f"an intervention is keyed (layer, feature, position); got {key!r}"
                           ) from None
        if not 0 <= layer < dic.n_layers:
            raise BadInput(f"intervention layer {layer} is not in 0..{dic.n_layers - 1}")
        if not 0 <= feature < dic.n_features:
            raise BadInput(f"feature {feature} is not in 0..{dic.n_features - 1} (layer {layer})")
        if not 0 <= pos < T:
            raise BadInput(f"position {pos} is not in the prompt's 0..{T - 1}")
        by_layer.setdefault(layer, []).append((feature, pos, float(value)))
    return by_layer


def _delta_fn(dic: dicts.Dictionaries, target: int, layers: list[int], by_layer):
    """``fn(mlp_out, x_ins) -> mlp_out + delta`` for MLP output ``target`` reading the inputs
    of ``layers`` (the intervened layers writing it)."""
    writes = dic.writes()

    def fn(out, srcs):
        if not isinstance(srcs, tuple):
            srcs = (srcs,)
        delta = jnp.zeros(out.shape, jnp.float32)
        for layer, x in zip(layers, srcs):
            z = dicts.encode(dic, layer, x).at[:, 0].set(0.0)  # [B, T, n]; BOS: none
            w = int(np.flatnonzero(writes[layer] == target)[0])
            for feature, pos, value in by_layer[layer]:
                step = value - z[:, pos, feature]  # [B]
                row = dic.W_dec[layer, feature, w]  # [d]
                delta = delta.at[:, pos].add(step[:, None] * row)
        return (out.astype(jnp.float32) + delta).astype(out.dtype)

    return fn


def intervention_hooks(dic: dicts.Dictionaries, settings: Mapping, n_pos: int) -> dict:
    """``{hook_mlp_out of each layer written: ReadsHook}`` setting the features of
    ``settings`` ({(layer, feature, position): value})."""
    by_layer = _check(dic, n_pos, settings)
    writes = dic.writes()
    hooks = {}
    for t in range(dic.n_layers):
        # a layer's features write its own and later layers only (a CLT's earlier rows are zero,
        # and its input hook comes after those layers' outputs in the forward)
        layers = sorted(l for l in by_layer if l <= t and t in writes[l])
        if layers:
            srcs = tuple(dic.input_hook(l) for l in layers)
            hooks[dic.output_hook(t)] = ReadsHook(srcs, _delta_fn(dic, t, layers, by_layer))
    return hooks


def intervene(model, saes, prompt, settings: Mapping, *, outputs: Mapping[str, str] | None = None,
              top: int = 10) -> dict:
    """Run ``model`` on ``prompt`` with the features of ``settings`` ({(layer, feature,
    position): value}) set, against the clean run. Returns ``tokens``, ``clean`` and
    ``intervened`` logits of the last position ``[V]`` and ``top``: rows (token, clean logit,
    new logit, clean probability, new probability) for the clean run's and the intervened
    run's ``top`` most probable tokens, by clean probability then new."""
    cfg, params = model.cfg, model.params
    dic = dicts.load(saes, outputs, model_cfg=cfg)
    tokens = prompt_tokens(cfg, getattr(model, "tokenizer", None), prompt)
    hooks = intervention_hooks(dic, settings, len(tokens))
    batch = jnp.asarray(tokens)[None]
    clean = np.asarray(jax.device_get(forward(cfg, params, batch).logits[0, -1]), np.float32)
    new = np.asarray(jax.device_get(forward(cfg, params, batch, interventions=hooks
                                            ).logits[0, -1]), np.float32)

    def probs(z):
        p = np.exp(z.astype(np.float64) - z.max())
        return p / p.sum()

    pc, pn = probs(clean), probs(new)
    ids = list(dict.fromkeys([*np.argsort(-pc)[:top].tolist(), *np.argsort(-pn)[:top].tolist()]))
    rows = [(int(i), float(clean[i]), float(new[i]), float(pc[i]), float(pn[i])) for i in ids]
    return {"tokens": tokens, "clean": clean, "intervened": new, "top": rows}


__all__ = ["intervene", "intervention_hooks"]

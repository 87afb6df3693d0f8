"""Checking a graph on the real model: set features to values and see the logits move.

`intervene` runs the real (unfrozen) model with each chosen feature's code set to a value, as
circuit-tracer's ``feature_intervention(..., freeze_attention=False)`` does: at every layer the
feature writes, its decoder times (value - its current code, recomputed from that forward's own
MLP input) is added to the MLP output, so the change propagates through attention, norms and
later MLPs. The MLPs themselves stay the real ones (the transcoders only say what to add).
The mechanism is steering's (`jsae.steering.write_edits`, which `layered_edit` uses to steer a
CLT); this module supplies the transcoders' codes and decoder rows in circuit-tracer's form.
Position 0 (the BOS) has no features, as in attribution: setting one there adds value x decoder.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jsae.circuits import dictionaries as dicts
from jsae.circuits.attribution import prompt_tokens
from jsae.errors import BadInput
from jsae.models.transformer import forward
from jsae.steering import write_edits


def _check(dic: dicts.Dictionaries, T: int, settings) -> list[tuple[int, int, int, float]]:
    edits = []
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
        edits.append((layer, feature, pos, float(value)))
    return edits


def _codes(dic: dicts.Dictionaries, layers: jax.Array, features: jax.Array, srcs: tuple
           ) -> jax.Array:
    """The codes ``[B, T, k]`` of edit i's feature ``features[i]`` of layer ``layers[i]`` from
    the input hooks of layers ``0..j`` (``srcs``, ``[B, T, d]`` each; later layers read zeros,
    harmless because their features write nothing to layer j). BOS has none."""
    x = jnp.stack([s.astype(jnp.float32) for s in srcs], axis=-2)  # [B, T, j+1, d]
    x = jnp.pad(x, [(0, 0), (0, 0), (0, dic.n_layers - x.shape[-2]), (0, 0)])
    pre = (jnp.einsum("btkd,dk->btk", jnp.take(x, layers, axis=-2),
                      dic.W_enc[layers, :, features].T) + dic.b_enc[layers, features])
    z = jnp.where(pre > dic.threshold[layers, features], pre, 0.0)
    return z.at[:, 0].set(0.0)


def intervention_hooks(dic: dicts.Dictionaries, settings: Mapping, n_pos: int) -> dict:
    """``{hook_mlp_out of each layer written: ReadsHook}`` setting the features of
    ``settings`` ({(layer, feature, position): value}): `jsae.steering.write_edits` with the
    transcoders' codes, each edit at its one position."""
    edits = _check(dic, n_pos, settings)
    layers, features, pos = (np.asarray([e[i] for e in edits], np.int32) for i in range(3))
    mask = np.zeros((n_pos, len(edits)), bool)
    mask[pos, np.arange(len(edits))] = True
    writes = dic.writes()
    # a layer's features write its own and later layers only (a CLT's earlier rows are zero,
    # and its input hook comes after those layers' outputs in the forward)
    targets = sorted({int(t) for l in set(layers.tolist()) for t in writes[l] if t >= l})

    def directions(t: int) -> jax.Array:
        zero = jnp.zeros(dic.W_dec.shape[-1], jnp.float32)
        return jnp.stack([dic.W_dec[l, f, int(np.flatnonzero(writes[l] == t)[0])]
                          if t >= l and t in writes[l] else zero for l, f in zip(layers, features)])

    return write_edits([dic.input_hook(l) for l in range(dic.n_layers)],
                       [dic.output_hook(t) for t in range(dic.n_layers)], targets,
                       Partial(_codes, dic, jnp.asarray(layers), jnp.asarray(features)),
                       directions, "clamp", [e[3] for e in edits], mask)


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

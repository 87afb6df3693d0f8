"""A model's MLP dictionaries as circuit tracing reads them: one neutral form for two formats.

circuit-tracer (`jsae.export.circuit_tracer`) and Gemma Scope 2 (`jsae.export.gemmascope2`)
hold a transcoder for every layer, or one cross-layer transcoder (CLT), each in its own files.
Both go through `Circuit`, whose arrays the architecture gives (`Arch.circuit_tensors`, from
norm-folded params) and takes (`Arch.from_circuit_tensors`); which architecture imports what
is `Arch.circuit_imports`, so this module names none. Neutral shapes (d = d_model, n features
per layer, L layers):

- per layer, one dict per layer: ``W_enc [d, n]``, ``W_dec [n, d]``, ``b_enc [n]``, ``b_dec
  [d]``, ``threshold [n]`` (JumpReLU ``pre * (pre > threshold)``; 0 is a ReLU), optional
  ``W_skip [d, d]`` (``x @ W_skip`` added to the output);
- cross layer, one dict: ``W_enc [L, d, n]``, ``W_dec [L*n, L, d]`` (latent ``l*n+i`` is layer
  l's feature i; its writes to layers before l are zero), ``b_enc [L*n]``, ``b_dec [L, d]``,
  ``threshold [L*n]``.

Hooks are jsae's ``blocks.{layer}.{site}``; the formats name the site once (circuit-tracer's
``feature_input_hook`` / ``feature_output_hook``) and the layer by the file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import BadInput
from jsae.runs import KEY_JOIN, input_hooks
from jsae.sae.archs import all_archs, for_circuit, get_arch
from jsae.sae.core import SAE, SAESpec, fold_norm

PER_LAYER, CROSS_LAYER = "per_layer", "cross_layer"
_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclasses.dataclass
class Circuit:
    """What one export writes and one import reads.

    ``kind``: PER_LAYER or CROSS_LAYER; ``layers``: the model layers covered (sorted);
    ``tensors``: per layer, one neutral dict per entry of ``layers``; cross layer, one dict;
    ``site_in`` / ``site_out``: the hook sites read and written (``hook_resid_mid``...).
    """

    kind: str
    layers: list[int]
    tensors: list[dict[str, np.ndarray]]
    site_in: str
    site_out: str
    model_name: str | None = None

    def hooks(self, site: str) -> list[str]:
        return [f"blocks.{i}.{site}" for i in self.layers]


def layer_site(hook: str, what: str = "hook") -> tuple[int, str]:
    """``blocks.{i}.{site}`` -> (i, site); anything else is not a layer's hook."""
    m = _HOOK.fullmatch(hook)
    if not m:
        raise BadInput(f"{what} {hook!r} is not a transformer layer's hook (blocks.N.SITE): "
                       "circuit tracing's formats hold the dictionaries of a model's layers")
    return int(m.group(1)), m.group(2)


def _one_site(hooks: Sequence[str], what: str) -> tuple[list[int], str]:
    pairs = [layer_site(h, what) for h in hooks]
    sites = sorted({s for _, s in pairs})
    if len(sites) > 1:
        raise BadInput(f"the {what}s read different sites ({', '.join(sites)}); circuit "
                       "tracing's formats name one site for every layer")
    return [i for i, _ in pairs], sites[0]


def gather(dictionaries: Sequence[tuple[str, str | None, SAE]],
           model_name: str | None = None) -> Circuit:
    """A `Circuit` from ``(input hook key, output hook key, SAE)`` triples (a run's
    dictionaries; a CLT's keys join its layers' hooks with ``+``); one-line errors name
    what does not fit."""
    kinds = []
    for key, _, sae in dictionaries:
        arch = get_arch(sae.spec.architecture)
        if arch.circuit_export is None:
            fits = ", ".join(a.name for a in all_archs() if a.circuit_export)
            raise BadInput(f"{key}: circuit tracing's formats hold ReLU / JumpReLU transcoders "
                           f"({fits}), not {sae.spec.architecture}")
        kinds.append(arch.circuit_export)
    if not dictionaries:
        raise BadInput("no dictionary to export")
    if len(set(kinds)) > 1 or (kinds[0] == CROSS_LAYER and len(dictionaries) > 1):
        raise BadInput("circuit tracing's formats hold either one transcoder per layer or one "
                       "cross-layer transcoder; this export has "
                       + ", ".join(f"{k} ({sae.spec.architecture})" for k, _, sae in dictionaries))
    for key, out, _ in dictionaries:
        if not out:
            raise BadInput(f"{key}: the hook this transcoder writes is not recorded "
                           "(hook_name_out); a transcoder set needs it")
    if kinds[0] == CROSS_LAYER:
        key, out, sae = dictionaries[0]
        layers, site_in = _one_site(input_hooks(key), "input hook")
        out_layers, site_out = _one_site(input_hooks(out), "output hook")
        if layers != list(range(len(layers))) or out_layers != layers:
            raise BadInput(f"{key}: a cross-layer transcoder must read and write layers "
                           f"0..{len(layers) - 1} in order; it reads {layers}, writes {out_layers}")
        return Circuit(CROSS_LAYER, layers, [_tensors(key, sae)], site_in, site_out, model_name)
    order = sorted(dictionaries, key=lambda d: layer_site(d[0], "input hook")[0])
    layers, site_in = _one_site([k for k, _, _ in order], "input hook")
    out_layers, site_out = _one_site([o for _, o, _ in order], "output hook")
    if out_layers != layers:
        bad = next((k, o) for (k, o, _), i, j in zip(order, layers, out_layers) if i != j)
        raise BadInput(f"{bad[0]}: writes {bad[1]}, another layer; a transcoder set maps each "
                       "layer's MLP input to its own output")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise BadInput(f"two dictionaries for layer {dup[0]}; a set has one per layer")
    shapes = {(sae.spec.d_in, sae.spec.d_sae) for _, _, sae in order}
    if len(shapes) > 1:
        raise BadInput("the layers' transcoders differ in [d_in, d_sae] ("
                       + ", ".join(f"{k}: [{s.spec.d_in}, {s.spec.d_sae}]" for k, _, s in order)
                       + "); circuit-tracer's sets need one width")
    skips = {"W_skip" in sae.params for _, _, sae in order}
    if len(skips) > 1:
        raise BadInput("some layers' transcoders have a skip connection and some not; a "
                       "set is one or the other")
    tensors = [_tensors(key, sae) for key, _, sae in order]
    return Circuit(PER_LAYER, layers, tensors, site_in, site_out, model_name)


def _tensors(key: str, sae: SAE) -> dict[str, np.ndarray]:
    """The neutral form of ``sae`` with its normalisation folded in (the formats read raw
    units); an option the formats cannot hold (a CLT's top k) is one line naming ``key``."""
    p = {k: np.asarray(jax.device_get(v), np.float32) for k, v in fold_norm(sae).params.items()}
    try:
        return get_arch(sae.spec.architecture).circuit_tensors(p)
    except ValueError as e:
        raise BadInput(f"{key}: {' '.join(str(e).split())}") from None


def to_saes(c: Circuit) -> dict[str, SAE]:
    """jsae dictionaries keyed by input hook (a CLT's hooks joined with ``+``)."""
    out = {}
    if c.kind == CROSS_LAYER:
        t = c.tensors[0]
        sae = _sae(CROSS_LAYER, t, d_sae=t["b_enc"].shape[0])
        return {KEY_JOIN.join(c.hooks(c.site_in)): sae}
    for hook, t in zip(c.hooks(c.site_in), c.tensors):
        out[hook] = _sae(PER_LAYER + ("_skip" if "W_skip" in t else ""), t,
                         d_sae=t["b_enc"].shape[0])
    return out


def _sae(kind: str, t: dict[str, np.ndarray], *, d_sae: int) -> SAE:
    arch = for_circuit(kind)
    params, options = arch.from_circuit_tensors(t)
    d_in = int(t["W_enc"].shape[-2])
    spec = SAESpec(arch.name, d_in, int(d_sae), **options)
    return SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
               norm_scale=jnp.ones((), jnp.float32), spec=spec)


def hook_names(c: Circuit) -> dict[str, Any]:
    """Metadata of an import: model name, the input hook key -> the output hook key."""
    if c.kind == CROSS_LAYER:
        outs = {KEY_JOIN.join(c.hooks(c.site_in)): KEY_JOIN.join(c.hooks(c.site_out))}
    else:
        outs = dict(zip(c.hooks(c.site_in), c.hooks(c.site_out)))
    return {"model_name": c.model_name, "kind": c.kind, "hook_names_out": outs}


__all__ = ["CROSS_LAYER", "Circuit", "PER_LAYER", "gather", "hook_names", "layer_site",
           "to_saes"]

"""The transcoders of a replacement model in one form: a transcoder per layer or a cross-layer
transcoder (CLT), as circuit-tracer holds them (the neutral tensors of `jsae.export.circuits`,
norm folded in, float32), so attribution computes on exactly what circuit-tracer reads from
the export.

Shapes, for L model layers, n features per layer, d = d_model, W = 1 (per layer) or L (CLT):

    W_enc [L, d, n]   b_enc [L, n]   threshold [L, n]    pre = x_in[l] @ W_enc[l] + b_enc[l]
                                                         z = pre * (pre > threshold)
    W_dec [L, n, W, d]  row w of layer l's feature writes layer ``writes[l, w]``
    b_dec [L, d]      W_skip [L, d, d] (optional: ``x_in[l] @ W_skip[l]`` added to layer l)

A feature of layer l reads ``blocks.l.<site_in>`` and writes ``blocks.t.hook_mlp_out``; a
per-layer transcoder's only row writes its own layer, a CLT's row t writes layer t (zero for
t < l).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import BadInput
from jsae.export.circuits import CROSS_LAYER, gather
from jsae.sae.core import SAE

# the transcoder input sites attribution follows through the frozen norms
INPUT_SITES = ("hook_resid_mid", "ln2.hook_normalized", "mlp.hook_in")
OUTPUT_SITE = "hook_mlp_out"


@flax.struct.dataclass
class Dictionaries:
    W_enc: jax.Array
    b_enc: jax.Array
    threshold: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    W_skip: jax.Array | None
    site_in: str = flax.struct.field(pytree_node=False)
    cross_layer: bool = flax.struct.field(pytree_node=False)

    @property
    def n_layers(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def n_features(self) -> int:
        """Features per layer."""
        return int(self.W_enc.shape[-1])

    def writes(self) -> np.ndarray:
        """``[L, W]`` int: the layer each decoder row of a layer's features writes."""
        L = self.n_layers
        if self.cross_layer:
            return np.broadcast_to(np.arange(L), (L, L)).copy()
        return np.arange(L)[:, None]

    def input_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.site_in}"

    def output_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{OUTPUT_SITE}"


def encode(dic: Dictionaries, layer: int, x: jax.Array) -> jax.Array:
    """Layer ``layer``'s codes ``z [..., n]`` of its inputs ``x [..., d]`` (float32)."""
    pre = x.astype(jnp.float32) @ dic.W_enc[layer] + dic.b_enc[layer]
    return jnp.where(pre > dic.threshold[layer], pre, 0.0)


def from_saes(saes: Mapping[str, SAE], outputs: Mapping[str, str] | None = None, *,
              model_cfg=None) -> Dictionaries:
    """``saes`` (input hook key -> transcoder; a CLT's key joins its hooks with ``+``) and
    the hooks they write (``outputs``; default each layer's ``hook_mlp_out``). One-line
    `BadInput` for what a replacement model of ``model_cfg`` cannot be built from."""
    outputs = dict(outputs or {})
    triples = []
    for key, sae in saes.items():
        out = outputs.get(key) or "+".join(f"blocks.{h.split('.')[1]}.{OUTPUT_SITE}"
                                           for h in key.split("+") if h.startswith("blocks."))
        triples.append((key, out, sae))
    c = gather(triples)
    if c.site_out != OUTPUT_SITE:
        raise BadInput(f"the transcoders write {c.site_out}; a replacement model replaces the "
                       f"MLPs, whose outputs are blocks.N.{OUTPUT_SITE}")
    if c.site_in not in INPUT_SITES:
        raise BadInput(f"the transcoders read {c.site_in}; attribution follows "
                       f"{', '.join(INPUT_SITES)} (an MLP's input)")
    if model_cfg is not None:
        n = model_cfg.n_layers
        missing = sorted(set(range(n)) - set(c.layers))
        if missing or len(c.layers) != n:
            raise BadInput(f"a replacement model needs a transcoder for every layer 0..{n - 1} "
                           f"of the model; missing layer(s) {', '.join(map(str, missing))}"
                           if missing else f"the transcoders cover layers {c.layers}; the "
                           f"model has {n}")
        d = int(c.tensors[0]["W_enc"].shape[-2])
        if d != model_cfg.d_model:
            raise BadInput(f"the transcoders read {d}-dimensional inputs; the model's "
                           f"d_model is {model_cfg.d_model} (transcoders of another model?)")
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    if c.kind == CROSS_LAYER:
        t = c.tensors[0]
        L, d, n = t["W_enc"].shape
        return Dictionaries(W_enc=f32(t["W_enc"]), b_enc=f32(t["b_enc"].reshape(L, n)),
                            threshold=f32(t["threshold"].reshape(L, n)),
                            W_dec=f32(t["W_dec"].reshape(L, n, L, d)), b_dec=f32(t["b_dec"]),
                            W_skip=None, site_in=c.site_in, cross_layer=True)
    ts = c.tensors
    skip = f32(np.stack([t["W_skip"] for t in ts])) if "W_skip" in ts[0] else None
    return Dictionaries(W_enc=f32(np.stack([t["W_enc"] for t in ts])),
                        b_enc=f32(np.stack([t["b_enc"] for t in ts])),
                        threshold=f32(np.stack([t["threshold"] for t in ts])),
                        W_dec=f32(np.stack([t["W_dec"] for t in ts])[:, :, None, :]),
                        b_dec=f32(np.stack([t["b_dec"] for t in ts])), W_skip=skip,
                        site_in=c.site_in, cross_layer=False)


def from_path(path: str | Path, *, model_cfg=None, member: str | None = None) -> Dictionaries:
    """A jsae run folder (a transcoder set or a CLT; of a family of them, ``member``'s) or a
    circuit-tracer folder."""
    from jsae.runs import is_run, member_saes

    path = Path(path)
    if is_run(path):
        saes, outs, _ = member_saes(path, member)
        return from_saes(saes, outs, model_cfg=model_cfg)
    if member is not None:
        raise BadInput(f"--member {member!r}: {path} is not a jsae run (a family's members are "
                       "a run's)")
    if (path / "config.yaml").exists():
        from jsae.export.circuit_tracer import load_circuit_tracer

        saes, meta = load_circuit_tracer(path)
        return from_saes(saes, meta["hook_names_out"], model_cfg=model_cfg)
    raise BadInput(f"{path}: neither a jsae run folder nor a circuit-tracer folder "
                   "(config.yaml + safetensors)")


def load(saes_or_path, outputs: Mapping[str, str] | None = None, *, model_cfg=None,
         member: str | None = None) -> Dictionaries:
    """`Dictionaries` as they are, from a path (a family run's ``member``), or from a mapping
    of SAEs."""
    if isinstance(saes_or_path, Dictionaries):
        return saes_or_path
    if isinstance(saes_or_path, (str, Path)):
        return from_path(saes_or_path, model_cfg=model_cfg, member=member)
    return from_saes(saes_or_path, outputs, model_cfg=model_cfg)


__all__ = ["Dictionaries", "INPUT_SITES", "OUTPUT_SITE", "encode", "from_path", "from_saes",
           "load"]

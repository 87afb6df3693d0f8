"""Steering: pure activation transforms for a hook point, and steered generation.

Every constructor returns a function ``fn(act[..., d_model]) -> act`` to hand to the LM forward
or to generation as ``interventions={hook: fn}``:

- :func:`clamp` sets features to values, :func:`scale` multiplies them, :func:`ablate` zeroes
  them. The SAE error term is kept: the model sees
  ``x - decode(encode(x)) + decode(z_edited)``. Because ``decode`` is affine this equals
  ``x + (z_edited - z) @ W_dec / norm_scale``, which is how it is computed (exact, and it never
  rounds x through the reconstruction); pass ``keep_error=False`` to replace x by the edited
  reconstruction instead.
- :func:`add` adds a fixed direction (e.g. a feature's decoder row, :func:`feature_direction`).
- :func:`compose` chains transforms; :func:`at_positions` applies one only where a mask is set.

Transcoders: a transcoder's features are read at its input hook and write to its output hook,
so ``clamp`` / ``scale`` / ``ablate`` take ``reads=INPUT_HOOK`` and go at the output hook,
``interventions={output_hook: clamp(tc, f, v, reads=input_hook)}``: the codes come from the
input hook of the same forward, the change ``(z_edited - z) @ W_dec`` lands on the output
(`jsae.models.transformer.ReadsHook`). :func:`interventions_for` picks the right form.

Several features at once: ``features`` and ``values`` may be lists (a scalar value is broadcast).
Values are in the SAE's code units, the units of ``jsae.sae.encode``.

The transforms are ``jax.tree_util.Partial`` pytrees: their arrays (SAE weights, feature ids,
values) travel as traced arguments of the jitted forward, so changing a value or a feature does
not recompile, and no weight is baked into the program as a constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jsae.errors import BadInput
from jsae.models.transformer import ReadsHook
from jsae.sae.archs import get_arch
from jsae.sae.core import SAE, activate, decode, encode, pre_activations

Array = jax.Array
Transform = Callable[[Array], Array]



def _as_features(sae: SAE, features) -> Array:
    try:
        f = np.atleast_1d(np.asarray(features))
    except (TypeError, ValueError) as e:  # ragged lists, ...
        raise BadInput(f"features must be an int or a non-empty list of ints; got {features!r}") from e
    if f.ndim != 1 or f.size == 0 or not np.issubdtype(f.dtype, np.integer):
        raise BadInput(f"features must be an int or a non-empty list of ints; got {features!r}")
    if (f < 0).any() or (f >= sae.spec.d_sae).any():
        raise BadInput(f"feature ids {f.tolist()} out of range for an SAE with {sae.spec.d_sae} "
                       f"latents (0-{sae.spec.d_sae - 1})")
    if len(set(f.tolist())) != f.size:
        dup = sorted({x for x in f.tolist() if f.tolist().count(x) > 1})
        raise BadInput(f"feature ids must be distinct; got {f.tolist()} (repeated: {dup})")
    return jnp.asarray(f, jnp.int32)


def _finite32(values, name: str) -> np.ndarray:
    """``values`` as float32, refusing NaN and values that are finite only in float64 (1e39
    becomes inf in float32 and would wipe out the activations it steers)."""
    try:
        v64 = np.asarray(values, np.float64)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name} must be a number or a list of numbers; got {values!r}") from e
    with np.errstate(over="ignore"):
        v = v64.astype(np.float32)
    bad = ~np.isfinite(v)
    if bad.any():
        x = float(v64.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]])
        why = "not a finite number" if not np.isfinite(x) else (
            f"beyond float32's range (+-{float(np.finfo(np.float32).max):.3g}), where the "
            "steered activations are computed")
        raise BadInput(f"{name} {x!r} is {why}")
    return v


def _as_values(values, n: int, name: str) -> Array:
    v = np.atleast_1d(_finite32(values, name))
    if v.ndim != 1 or v.size not in (1, n):
        raise BadInput(f"{name} must be a scalar or a list of {n} numbers; got {values!r}")
    return jnp.asarray(np.broadcast_to(v, (n,)), jnp.float32)


def sub_sae(sae: SAE, features: Array) -> SAE:
    """An SAE restricted to ``features`` (encoder columns, decoder rows, per-latent params).

    Only for architectures whose codes are elementwise in the pre-activations
    (`Arch.elementwise`); the per-latent parameters are those of `Arch.latent_axes`."""
    axes = get_arch(sae.spec.architecture).latent_axes()
    q = {name: (jnp.take(v, features, axis=axes[name]) if name in axes else v)
         for name, v in sae.params.items()}
    spec = dataclasses.replace(sae.spec, d_sae=int(features.shape[0]))
    return SAE(params=q, norm_scale=sae.norm_scale, spec=spec)


def feature_codes(sae: SAE, x: Array, features: Array) -> Array:
    """Codes of ``features`` for raw activations ``x [..., d_in] -> [..., n_features]``.

    Equals ``encode(sae, x)[..., features]``; computes only those latents when the
    architecture allows it (all but topk), so a steered forward does not pay for the whole
    dictionary."""
    if get_arch(sae.spec.architecture).elementwise:
        small = sub_sae(sae, features)
        x_n = x.astype(jnp.float32) * sae.norm_scale
        return activate(small, pre_activations(small, x_n), x_n)
    return jnp.take(encode(sae, x), features, axis=-1)


def _edit(sae: SAE, features: Array, new_codes: Callable, keep_error: bool, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    if keep_error:
        z_f = feature_codes(sae, xf, features)
        delta = jnp.matmul(new_codes(z_f) - z_f, sae.params["W_dec"][features]) / sae.norm_scale
        return (xf + delta).astype(x.dtype)
    z = encode(sae, xf)
    z = z.at[..., features].set(new_codes(z[..., features]))
    return decode(sae, z).astype(x.dtype)


def _edit_reading(sae: SAE, features: Array, new_codes: Callable, keep_error: bool, act: Array,
                  src: Array) -> Array:
    """A transcoder's edit: codes from ``src`` (its input hook), the change added to ``act``
    (its output hook); ``keep_error=False`` replaces ``act`` by the edited prediction."""
    srcf = src.astype(jnp.float32)
    if keep_error:
        z_f = feature_codes(sae, srcf, features)
        delta = jnp.matmul(new_codes(z_f) - z_f, sae.params["W_dec"][features]) / sae.norm_scale
        return (act.astype(jnp.float32) + delta).astype(act.dtype)
    z = encode(sae, srcf)
    z = z.at[..., features].set(new_codes(z[..., features]))
    return decode(sae, z, srcf).astype(act.dtype)


def _clamp_r(sae, features, values, act, src):
    return _edit_reading(sae, features, lambda z: jnp.broadcast_to(values, z.shape), True, act, src)


def _clamp_replace_r(sae, features, values, act, src):
    return _edit_reading(sae, features, lambda z: jnp.broadcast_to(values, z.shape), False, act,
                         src)


def _scale_r(sae, features, factors, act, src):
    return _edit_reading(sae, features, lambda z: z * factors, True, act, src)


def _scale_replace_r(sae, features, factors, act, src):
    return _edit_reading(sae, features, lambda z: z * factors, False, act, src)


# module-level so that a transform's pytree structure (and the jit cache key) is stable; the
# error-term choice is part of the function, never a traced argument
def _clamp(sae, features, values, x):
    return _edit(sae, features, lambda z: jnp.broadcast_to(values, z.shape), True, x)


def _clamp_replace(sae, features, values, x):
    return _edit(sae, features, lambda z: jnp.broadcast_to(values, z.shape), False, x)


def _scale(sae, features, factors, x):
    return _edit(sae, features, lambda z: z * factors, True, x)


def _scale_replace(sae, features, factors, x):
    return _edit(sae, features, lambda z: z * factors, False, x)


def _check_reads(sae: SAE, reads: str | None) -> None:
    tc = get_arch(sae.spec.architecture).transcoder
    if tc and reads is None:
        raise ValueError(f"a {sae.spec.architecture} reads one hook and writes another: pass "
                         "reads=<its input hook> and put the transform at its output hook "
                         "(or use jsae.steering.interventions_for)")
    if reads is not None and not tc:
        raise ValueError(f"reads= is for transcoders; a {sae.spec.architecture} SAE edits the "
                         "hook it reads")


def clamp(sae: SAE, feature, value, *, keep_error: bool = True, reads: str | None = None
          ) -> Transform:
    """Set feature(s) to ``value`` at every position the transform is applied to
    (``reads``: a transcoder's input hook; see the module docstring)."""
    _check_reads(sae, reads)
    f = _as_features(sae, feature)
    v = _as_values(value, f.shape[0], "value")
    if reads is not None:
        return ReadsHook(reads, Partial(_clamp_r if keep_error else _clamp_replace_r, sae, f, v))
    return Partial(_clamp if keep_error else _clamp_replace, sae, f, v)


def scale(sae: SAE, feature, factor, *, keep_error: bool = True, reads: str | None = None
          ) -> Transform:
    """Multiply feature(s) by ``factor`` (``0``: ablate, ``2``: double)."""
    _check_reads(sae, reads)
    f = _as_features(sae, feature)
    v = _as_values(factor, f.shape[0], "factor")
    if reads is not None:
        return ReadsHook(reads, Partial(_scale_r if keep_error else _scale_replace_r, sae, f, v))
    return Partial(_scale if keep_error else _scale_replace, sae, f, v)


def ablate(sae: SAE, feature, *, keep_error: bool = True, reads: str | None = None
           ) -> Transform:
    """Remove feature(s): ``x - z_f * W_dec[f] / norm_scale`` (their whole contribution)."""
    return scale(sae, feature, 0.0, keep_error=keep_error, reads=reads)


def interventions_for(sae: SAE, hook: str, transform: Callable[..., Transform], *args,
                      output_hook: str | None = None, **kw) -> dict[str, Transform]:
    """``{hook: transform(sae, *args)}`` for an SAE; for a transcoder read at ``hook`` and
    writing ``output_hook``: ``{output_hook: transform(sae, *args, reads=hook)}``; for a
    cross-layer transcoder (``hook`` / ``output_hook`` its joined keys): one edit per output
    layer the features write to (:func:`layered_edit`). ``transform``: clamp, scale or ablate.

    >>> interventions_for(tc, "blocks.6.hook_resid_mid", clamp, 123, 8.0,
    ...                   output_hook="blocks.6.hook_mlp_out")
    """
    if output_hook is None or output_hook == hook:
        return {hook: transform(sae, *args, **kw)}
    from jsae.runs import input_hooks

    ins, outs = input_hooks(hook), input_hooks(output_hook)
    if len(outs) > 1:
        if transform is ablate:
            args = (args[0], 0.0)
        mode = {clamp: "clamp", scale: "scale", ablate: "scale"}.get(transform)
        if mode is None:
            raise ValueError("a cross-layer dictionary is edited with clamp, scale or ablate")
        return layered_edit(sae, ins, outs, mode, *args, **kw)
    return {output_hook: transform(sae, *args, reads=hook, **kw)}


def _new_codes(mode: str, z: Array, values: Array) -> Array:
    return jnp.broadcast_to(values, z.shape) if mode == "clamp" else z * values


def _write(mode: str, codes: Callable, dirs: Array, values: Array, mask: Array | None,
           act: Array, srcs: tuple) -> Array:
    """``act [..., T, d]`` (an output hook) plus ``(new - z) @ dirs``, where ``z = codes(srcs)
    [..., T, k]`` are the k edited features' codes from the input hooks ``srcs`` of the same
    forward, ``new`` those codes clamped to / scaled by ``values [k]``, and ``dirs [k, d]``
    each feature's raw write to this output; only where ``mask [T, k]`` is set (None: at every
    position)."""
    z = codes(srcs).astype(jnp.float32)
    step = _new_codes(mode, z, values) - z
    if mask is not None:
        step = jnp.where(mask, step, 0.0)
    return (act.astype(jnp.float32) + jnp.matmul(step, dirs)).astype(act.dtype)


# module-level, one per mode, so the jit cache key is stable (as _clamp above)
def _write_clamp(*a):
    return _write("clamp", *a)


def _write_scale(*a):
    return _write("scale", *a)


def write_edits(input_hooks: Sequence[str], output_hooks: Sequence[str], targets, codes: Callable,
                directions: Callable[[int], Array], mode: str, values, mask=None
                ) -> dict[str, Transform]:
    """The one mechanism that sets (``mode="clamp"``) or scales (``"scale"``) features of a
    transcoder set or a cross-layer transcoder in the real model, keeping the error term:
    `layered_edit` (steering a CLT) and `jsae.circuits.intervene` (checking a graph) both build
    on it. ``{output_hooks[t]: ReadsHook(input_hooks[:t+1], ..)}`` for each layer ``t`` in
    ``targets``: there the k edited features' codes ``codes(inputs of layers 0..t) -> [..., T,
    k]`` come from the same forward (a causal dictionary's features of layer ``l`` read input
    ``l`` and write outputs ``t >= l``; an input hook comes before its own layer's output) and
    ``(new - z) @ directions(t)`` is added (``directions(t) [k, d]``: each feature's raw write to
    output ``t``, zero where it writes nothing there); ``values [k]``; ``mask [T, k]``: where
    each edit applies (None: every position). ``codes`` and the arrays travel as jit arguments
    (a `Partial`), so other values or features do not recompile."""
    fn = {"clamp": _write_clamp, "scale": _write_scale}[mode]
    v = jnp.asarray(values, jnp.float32)
    m = None if mask is None else jnp.asarray(mask, bool)
    return {output_hooks[t]: ReadsHook(tuple(input_hooks[:t + 1]),
                                       Partial(fn, codes, directions(t), v, m))
            for t in targets}


def _clt_encode(sae: SAE, srcs: tuple) -> Array:
    """A causal cross-layer dictionary's codes ``[..., d_sae]`` from the input hooks ``0..j``
    (``srcs``, ``[..., d]`` each); the later layers' inputs are zero, harmless because their
    features never write to layer ``j``."""
    n_hooks = get_arch(sae.spec.architecture).n_hooks(sae.spec)
    x = jnp.stack([s.astype(jnp.float32) for s in srcs], axis=-2)  # [..., j+1, d]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, n_hooks - x.shape[-2]), (0, 0)])
    return encode(sae, x)


def _clt_codes(sae: SAE, features: Array, srcs: tuple) -> Array:
    return jnp.take(_clt_encode(sae, srcs), features, axis=-1)


def _replace_layer(mode: str, sae: SAE, features: Array, values: Array, act: Array,
                   srcs: tuple) -> Array:
    """Output layer ``j = len(srcs) - 1`` replaced by the CLT's reconstruction with
    ``features`` edited (``keep_error=False``)."""
    z = _clt_encode(sae, srcs)
    new = _new_codes(mode, jnp.take(z, features, axis=-1), values)
    return decode(sae, z.at[..., features].set(new))[..., len(srcs) - 1, :].astype(act.dtype)


def _replace_clamp(*a):
    return _replace_layer("clamp", *a)


def _replace_scale(*a):
    return _replace_layer("scale", *a)


def layered_edit(sae: SAE, input_hooks: Sequence[str], output_hooks: Sequence[str], mode: str,
                 features, values, *, keep_error: bool = True) -> dict[str, Transform]:
    """Clamp (``mode="clamp"``) or scale (``"scale"``) features of a causal cross-layer
    dictionary (a CLT: feature ``f`` reads the input hook of its own layer and writes that
    layer's and every later output hook). ``{output_hooks[j]: ReadsHook(input_hooks[:j+1], ..)}``
    for every layer ``j`` from the earliest edited feature's on: at each, the codes come from
    the inputs of the same forward and ``(z_edited - z) @ W_dec[:, j]`` is added (the error term
    kept: `write_edits`), or the output is replaced by the edited reconstruction
    (``keep_error=False``)."""
    arch = get_arch(sae.spec.architecture)
    layers = arch.feature_layers(sae.spec)
    n = arch.n_hooks(sae.spec)
    if layers is None or not arch.multi_hook:
        raise ValueError(f"a {sae.spec.architecture} is not a cross-layer dictionary")
    if len(input_hooks) != n or len(output_hooks) != n:
        raise BadInput(f"a dictionary over {n} layers needs {n} input and output hooks; got "
                       f"{len(input_hooks)} and {len(output_hooks)}")
    f = _as_features(sae, features)
    v = _as_values(values, f.shape[0], "value" if mode == "clamp" else "factor")
    first = int(np.asarray(layers)[np.asarray(f)].min())
    if keep_error:
        def directions(j):
            return jnp.stack([feature_direction(sae, int(i), layer=j) for i in np.asarray(f)])

        return write_edits(input_hooks, output_hooks, range(first, n),
                           Partial(_clt_codes, sae, f), directions, mode, v)
    fn = {"clamp": _replace_clamp, "scale": _replace_scale}[mode]
    return {output_hooks[j]: ReadsHook(tuple(input_hooks[:j + 1]), Partial(fn, sae, f, v))
            for j in range(first, n)}


def _add(direction, coefficient, x):
    return (x.astype(jnp.float32) + coefficient * direction).astype(x.dtype)


def add(direction, coefficient=1.0) -> Transform:
    """Add ``coefficient * direction`` (``[d_model]``, raw activation units) to the activation."""
    d = np.asarray(direction, np.float32) if not isinstance(direction, jax.Array) else direction
    if d.ndim != 1:
        raise BadInput(f"direction must be a vector [d_model]; got shape {d.shape}")
    c = _finite32(coefficient, "coefficient")
    if c.ndim != 0:
        raise BadInput(f"coefficient must be a number; got {coefficient!r}")
    return Partial(_add, jnp.asarray(d, jnp.float32), jnp.asarray(c, jnp.float32))


def feature_direction(sae: SAE, feature: int, *, unit: bool = False,
                      layer: int | None = None) -> Array:
    """The raw-activation change per unit of a feature's code: ``W_dec[f] / norm_scale``
    (``unit=True``: that vector normalised to length 1); for a dictionary that writes several
    hooks, its row at its ``layer``-th hook."""
    arch = get_arch(sae.spec.architecture)
    w = arch.decoder_rows(sae.params, jnp.asarray([int(feature)]))[0]
    n = arch.n_hooks(sae.spec)
    if n > 1:
        if layer is None:
            raise ValueError(f"a {sae.spec.architecture} writes {n} hooks: pass layer= "
                             f"(0..{n - 1}), or use add_feature")
        w = w[int(layer)]
    d = w / sae.norm_scale
    return d / jnp.linalg.norm(d) if unit else d


def add_feature(sae: SAE, hooks: Sequence[str], features, values) -> dict[str, Transform]:
    """``{hook: fn}`` adding ``values[i] * W_dec[features[i]]`` wherever the dictionary writes:
    its one hook, or each of a crosscoder's ``hooks`` (its row at that hook). The way to steer
    an acausal crosscoder: its codes read every hook, later ones included, so no single hook of
    a forward pass knows them and clamp cannot be causal."""
    hooks = list(hooks)
    n = get_arch(sae.spec.architecture).n_hooks(sae.spec)
    if len(hooks) != n:
        raise BadInput(f"{len(hooks)} hooks given for a dictionary that writes {n}")
    fs = np.asarray(_as_features(sae, features), np.int64)
    vs = np.asarray(_as_values(values, fs.shape[0], "values"))
    out = {}
    for i, h in enumerate(hooks):
        lay = i if n > 1 else None
        fns = [add(feature_direction(sae, int(f), layer=lay), float(v)) for f, v in zip(fs, vs)]
        out[h] = fns[0] if len(fns) == 1 else compose(*fns)
    return out


def _compose(fns, x):
    for fn in fns:
        x = fn(x)
    return x


def compose(*fns: Transform) -> Transform:
    """Apply ``fns`` in order (the first one sees the original activation)."""
    if not fns:
        raise ValueError("compose needs at least one transform")
    if any(isinstance(f, ReadsHook) for f in fns):
        raise ValueError("compose takes transforms of one hook; a transcoder's edit (reads=) "
                         "goes alone at its output hook")
    return Partial(_compose, tuple(fns))


def _at_positions(fn, mask, x):
    m = jnp.asarray(mask, bool)
    while m.ndim < x.ndim:
        m = m[..., None]
    return jnp.where(m, fn(x), x)


def _at_positions_reading(fn, mask, x, src):
    m = jnp.asarray(mask, bool)
    while m.ndim < x.ndim:
        m = m[..., None]
    return jnp.where(m, fn(x, src), x)


def at_positions(fn: Transform, mask) -> Transform:
    """Apply ``fn`` only where ``mask`` is true (``x`` elsewhere). ``mask [B, T]`` selects
    positions; ``mask [B]`` selects whole rows of a batch (any sequence length, so it also
    works inside cached generation)."""
    if isinstance(fn, ReadsHook):
        return ReadsHook(fn.source, Partial(_at_positions_reading, fn.fn, jnp.asarray(mask, bool)))
    return Partial(_at_positions, fn, jnp.asarray(mask, bool))


# ----------------------------------------------------------------------------------------------
# generation


def generate(model, prompts: Sequence[str] | str, max_new_tokens: int = 32, **kw) -> list[str]:
    """``jsae.models.generate`` (KV cache, jitted, batched); same arguments:
    ``temperature``, ``top_p``, ``key``, ``interventions={hook: fn}``,
    ``intervene_on="all"|"prompt"|"generated"``."""
    from jsae.models import generate as _generate

    if isinstance(prompts, str):
        prompts = [prompts]
    return _generate(model, list(prompts), max_new_tokens, **kw)


def generate_pair(
    model,
    prompts: Sequence[str] | str,
    interventions: dict[str, Transform],
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    intervene_on: str = "all",
) -> tuple[list[str], list[str]]:
    """(baseline, steered) continuations of each prompt, with the same sampling key.

    Greedy decoding runs both in one batch (the transforms masked to the steered rows: one
    compiled program, one pass); sampling runs them as two calls with the same key, so the
    two continuations see the same random draws."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    key = jax.random.PRNGKey(seed)
    kw = dict(temperature=temperature, top_p=top_p, key=key)
    if float(temperature) == 0.0:
        n = len(prompts)
        rows = jnp.asarray(np.arange(2 * n) >= n)
        fns = {h: at_positions(f, rows) for h, f in interventions.items()}
        out = generate(model, prompts + prompts, max_new_tokens, interventions=fns,
                       intervene_on=intervene_on, **kw)
        return out[:n], out[n:]
    base = generate(model, prompts, max_new_tokens, **kw)
    steered = generate(model, prompts, max_new_tokens, interventions=interventions,
                       intervene_on=intervene_on, **kw)
    return base, steered


__all__ = [
    "ablate", "add", "at_positions", "clamp", "compose", "feature_codes", "feature_direction",
    "generate", "generate_pair", "interventions_for", "layered_edit", "scale", "sub_sae",
    "write_edits",
]

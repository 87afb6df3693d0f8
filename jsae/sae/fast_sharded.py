"""The fast TopK path on a mesh whose ``model`` axis splits the latents (``model > 1``).

`jsae.sae.fast` keeps codes sparse on one latent shard.  With latents split over ``model``
(W_enc columns, b_enc, W_dec rows: see `jsae.parallel`), GSPMD cannot run its top-k or its
gathers without gathering the whole dictionary on every device, so this module writes the
three sparse pieces with `jax.shard_map` and explicit collectives.  Device (d, s) holds rows
``B_d`` of the batch and latents ``[s * F, (s + 1) * F)`` with ``F = d_sae / model``:

- selection (no gradient): row-blocked local encoder matmul, local top-k, then an exact merge
  of the ``model`` local top-k lists (all-gather of ``[b, k]`` values and indices, top-k of
  the ``model * k`` candidates; shard order keeps ties on the lower latent index, as
  `jax.lax.top_k`).  AuxK's selection among dead latents is merged the same way.  No
  ``[B, d_sae]`` array exists anywhere, only ``[block, F]`` per device.
- sparse decoder: each device decodes the selected entries it owns (the others are masked to
  zero) and the partial reconstructions are summed over ``model`` (one ``[B_d, d_in]``
  all-reduce).  Backward: ``d_vals`` from the owner (all-reduce over ``model``), ``dW_dec``
  scatter-added into the local rows and summed over ``data``.
- sparse encoder backward: ``dW_enc``/``db_enc`` scatter-added into the local columns and
  summed over ``data``; ``db_dec = -W_enc db_enc`` summed over ``model``.

Each device walks all ``k`` slabs of its rows with the unowned entries zeroed: ``k B_d d_in``
gathered multiply-adds, small next to the local encoder matmul ``B_d d_in F`` whenever
``F >> k`` (the case that needs a model axis at all).  Values and gradients equal the
single-device paths within float32 rounding (the partial sums are added in another order).

Only TopK is routed here; BatchTopK on ``model > 1`` uses the reference path with the exact
sharded top-k of `jsae.parallel`.  The input ``x_n`` gets no gradient here (it is data).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsae.parallel import DATA, MODEL
from jsae.sae import fast
from jsae.sae.core import SAE, pre_activations

Array = jax.Array

ROWS = P(DATA, None)  # [B, ...] split by rows over data
SLABS = P(None, DATA)  # [k, B] slabs: the batch axis is the second one


def applies(sae: SAE, mesh: Mesh | None) -> bool:
    """Whether `jsae.sae.losses.sae_loss` routes this SAE here on ``mesh``."""
    return (
        mesh is not None and mesh.shape[MODEL] > 1 and bool(sae.spec.fast_path)
        and sae.spec.architecture == "topk"
    )


def _owned(cols: Array, width: int) -> tuple[Array, Array]:
    """(mask, local index) of the latents in ``cols`` that this model shard holds."""
    lo = jax.lax.axis_index(MODEL) * width
    mine = (cols >= lo) & (cols < lo + width)
    return mine, jnp.where(mine, cols - lo, 0)


def _merge_top(vals: Array, idx: Array, k: int, width: int) -> tuple[Array, Array]:
    """Exact top-k over all model shards from each shard's local top list ``[b, k_local]``."""
    idx = idx.astype(jnp.int32) + jax.lax.axis_index(MODEL) * width
    all_v = jax.lax.all_gather(vals, MODEL, axis=1, tiled=True)  # [b, model * k_local]
    all_i = jax.lax.all_gather(idx, MODEL, axis=1, tiled=True)
    top_v, pos = jax.lax.top_k(all_v, k)
    return top_v, jnp.take_along_axis(all_i, pos, axis=1)


@functools.cache
def _ops(mesh: Mesh):
    """The shard_map'd selection, sparse decoder and encoder hook for ``mesh`` (cached)."""
    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

    def select(params, x_n, dead_mask, any_dead, *, spec, k, k_aux, recall):
        @functools.partial(
            smap,
            in_specs=(P(None, MODEL), P(MODEL), P(), ROWS, P(MODEL), P()),
            out_specs=(ROWS,) * 4,
        )
        def local(w_enc, b_enc, b_dec, x, dead, any_dead):
            width = w_enc.shape[1]
            s = SAE({"W_enc": w_enc, "b_enc": b_enc, "b_dec": b_dec}, jnp.ones(()), spec)
            n, d = x.shape
            blk = fast._block_rows(n)

            def body(_, xb):
                pre = pre_activations(s, xb)  # [blk, width]
                v, i = fast.select_topk(pre, min(k, width), recall=recall)
                top = _merge_top(v, i, k, width)

                def aux(pre):
                    v, i = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), min(k_aux, width))
                    return _merge_top(v, i, k_aux, width)

                def no_aux(pre):
                    return (jnp.full((pre.shape[0], k_aux), -jnp.inf, pre.dtype),
                            jnp.zeros((pre.shape[0], k_aux), jnp.int32))

                return None, (*top, *jax.lax.cond(any_dead, aux, no_aux, pre))

            _, out = jax.lax.scan(body, None, x.reshape(n // blk, blk, d))
            return tuple(o.reshape(n, o.shape[-1]) for o in out)

        p = jax.lax.stop_gradient(params)
        v, i, av, ai = local(p["W_enc"], p["b_enc"], p["b_dec"], jax.lax.stop_gradient(x_n),
                             dead_mask, any_dead)
        return (v, i), (av, ai)

    # ---- sparse decoder: x_hat [B, d_in] = sum_j vals[j] * W_dec[cols[j]] ----------------
    @functools.partial(smap, in_specs=(SLABS, SLABS, P(MODEL, None)), out_specs=ROWS)
    def decode_fwd_local(vals, cols, w_dec):
        mine, lc = _owned(cols, w_dec.shape[0])
        part = fast._decode_fwd_impl(jnp.where(mine, vals, 0.0), None, lc, w_dec, vals.shape[1])
        return jax.lax.psum(part, MODEL)

    @functools.partial(smap, in_specs=(SLABS, SLABS, P(MODEL, None), ROWS),
                       out_specs=(SLABS, P(MODEL, None)))
    def decode_bwd_local(vals, cols, w_dec, g):
        mine, lc = _owned(cols, w_dec.shape[0])
        res = (jnp.where(mine, vals, 0.0), None, lc, w_dec)
        d_vals, _, _, dw = fast._decode_bwd(vals.shape[1], res, g)
        return jax.lax.psum(jnp.where(mine, d_vals, 0.0), MODEL), jax.lax.psum(dw, DATA)

    @jax.custom_vjp
    def decode(vals, cols, w_dec):
        return decode_fwd_local(vals, cols, w_dec)

    def decode_fwd(vals, cols, w_dec):
        return decode_fwd_local(vals, cols, w_dec), (vals, cols, w_dec)

    def decode_bwd(res, g):
        d_vals, dw = decode_bwd_local(*res, g)
        return d_vals, None, dw

    decode.defvjp(decode_fwd, decode_bwd)

    # ---- encoder hook: identity on the selected pre-activations, sparse backward ---------
    @functools.partial(
        smap,
        in_specs=(SLABS, SLABS, ROWS, P(), P(None, MODEL), P(MODEL)),
        out_specs=(P(), P(None, MODEL), P(MODEL)),
    )
    def hook_bwd_local(d_vals, cols, x_n, b_dec, w_enc, b_enc):
        mine, lc = _owned(cols, w_enc.shape[1])
        res = (None, lc, x_n, b_dec, w_enc, b_enc)
        grads = fast._hook_bwd(res, jnp.where(mine, d_vals, 0.0))  # dx is dropped by XLA
        dw_enc, db_enc = jax.lax.psum(grads[5], DATA), jax.lax.psum(grads[6], DATA)
        db_dec = -jax.lax.psum(w_enc.astype(jnp.float32) @ db_enc.astype(jnp.float32), MODEL)
        return db_dec.astype(b_dec.dtype), dw_enc, db_enc

    @jax.custom_vjp
    def hook(pre_vals, cols, x_n, b_dec, w_enc, b_enc):
        del cols, x_n, b_dec, w_enc, b_enc
        return pre_vals

    def hook_fwd(pre_vals, cols, x_n, b_dec, w_enc, b_enc):
        return pre_vals, (cols, x_n, b_dec, w_enc, b_enc)

    def hook_bwd(res, d_vals):
        cols, x_n, b_dec, w_enc, b_enc = res
        db_dec, dw_enc, db_enc = hook_bwd_local(d_vals, cols, x_n, b_dec, w_enc, b_enc)
        return jnp.zeros_like(d_vals), None, jnp.zeros_like(x_n), db_dec, dw_enc, db_enc

    hook.defvjp(hook_fwd, hook_bwd)
    return select, decode, hook


def _codes(hook, vals: Array, cols: Array, x_n: Array, params: dict) -> Array:
    """Differentiable codes relu(pre[rows, cols]) from selected raw values ``[m, B]``."""
    x_n = jax.lax.stop_gradient(x_n)
    v = hook(vals, cols, x_n, params["b_dec"], params["W_enc"], params["b_enc"])
    return jax.nn.relu(v)


def sharded_fast_sae_loss(
    sae: SAE,
    x_n: Array,
    mesh: Mesh,
    *,
    dead_mask: Array | None = None,
    aux_coef: float = 1.0 / 32.0,
) -> tuple[Array, dict]:
    """`jsae.sae.fast.fast_sae_loss` (TopK) with latents split over ``mesh``'s model axis.

    Same terms and gradients as the single-device paths; ``aux["z"]`` is a
    `jsae.sae.fast.SparseCodes` with slabs ``[k, B]``.  AuxK always uses the sparse decoder.
    """
    spec, p = sae.spec, sae.params
    if dead_mask is None:
        dead_mask = jnp.zeros((spec.d_sae,), bool)
    select, decode, hook = _ops(mesh)
    k_aux = spec.aux_k_resolved
    any_dead = jnp.any(dead_mask)
    (v, i), (av, ai) = select(p, x_n, dead_mask, any_dead, spec=spec, k=spec.k, k_aux=k_aux,
                              recall=spec.topk_recall)
    cols = i.T
    vals = _codes(hook, v.T, cols, x_n, p)
    x_hat = decode(vals, cols, p["W_dec"]) + p["b_dec"]
    recon = jnp.sum((x_hat - x_n) ** 2, axis=-1).mean()
    residual = jax.lax.stop_gradient(x_n - x_hat)

    def auxk(operands):
        (av, ai), residual, params = operands
        ok = jnp.isfinite(av.T)
        codes = jnp.where(ok, _codes(hook, jnp.where(ok, av.T, 0.0), ai.T, x_n, params), 0.0)
        e_hat = decode(codes, ai.T, params["W_dec"])
        return jnp.sum((e_hat - residual) ** 2, axis=-1).mean()

    aux_loss = jax.lax.cond(any_dead, auxk, lambda _: jnp.zeros((), jnp.float32),
                            (jax.lax.stop_gradient((av, ai)), residual, p))
    terms = {"recon": recon, "auxk": aux_coef * aux_loss}
    codes = fast.SparseCodes(vals, None, cols, x_n.shape[0], spec.d_sae)
    return sum(terms.values()), {**terms, "z": codes, "x_hat": x_hat}


__all__ = ["applies", "sharded_fast_sae_loss"]

"""The fast TopK path on a mesh whose ``model`` axis splits the latents (``model > 1``).

`jsae.sae.fast` keeps codes sparse on one latent shard.  With latents split over ``model``
(W_enc columns, b_enc, W_dec rows: see `jsae.parallel`), GSPMD cannot run its top-k or its
gathers without gathering the whole dictionary on every device, so this module writes the
sparse pieces with `jax.shard_map` and explicit collectives.  Device (d, s) holds rows
``B_d`` of the batch and latents ``[s * F, (s + 1) * F)`` with ``F = d_sae / model``:

- selection (no gradient): row-blocked local encoder matmul and local top-k (no collective
  inside the loop), then one exact merge of the ``model`` local top-k lists (all-gather of
  ``[B_d, k]`` values and indices, top-k of the ``model * k`` candidates; shard order keeps
  ties on the lower latent index, as `jax.lax.top_k`).  AuxK's selection among dead latents
  is merged the same way.  No ``[B, d_sae]`` array exists anywhere, only ``[block, F]``.
- decode (one op for the main codes and AuxK's): each device decodes the selected entries it
  owns (the others are masked to zero) and the partial reconstructions are summed over
  ``model`` (a ``[B_d, d_in]`` all-reduce each).  Its VJP gives every parameter's gradient:
  on each device the owned entries' ``dW_dec`` rows, ``dW_enc`` columns and ``db_enc`` by
  scatter-add, main and AuxK added locally, then one all-reduce over ``data`` per gradient;
  ``db_dec = -W_enc db_enc`` summed over ``model``.  AuxK's work sits in a local
  ``lax.cond`` (skipped when no latent is dead) with every collective outside it.

Each device walks all ``k`` slabs of its rows with the unowned entries zeroed: ``k B_d d_in``
gathered multiply-adds, small next to the local encoder matmul ``B_d d_in F`` whenever
``F >> k`` (the case that needs a model axis at all).  Values and gradients equal the
single-device paths within float32 rounding (the partial sums are added in another order).

Only TopK is routed here; BatchTopK on ``model > 1`` uses the reference path with the exact
sharded batch-wide selection of `jsae.parallel`.  The input ``x_n`` gets no gradient here (it is data).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jsae.sae import fast
from jsae.sae.archs import get_arch
from jsae.sae.core import SAE, pre_activations
from jsae.sae.selection import DATA, MODEL, merge_model_topk

Array = jax.Array

ROWS = P(DATA, None)  # [B, ...] split by rows over data
SLABS = P(None, DATA)  # [k, B] slabs: the batch axis is the second one


def applies(sae: SAE, mesh: Mesh | None) -> bool:
    """Whether `jsae.sae.losses.sae_loss` routes this SAE here on ``mesh``."""
    return (
        mesh is not None and mesh.shape[MODEL] > 1 and bool(sae.spec.fast_path)
        and get_arch(sae.spec.architecture).sharded_fast
    )


def _owned(cols: Array, width: int) -> tuple[Array, Array]:
    """(mask, local index) of the latents in ``cols`` that this model shard holds."""
    lo = jax.lax.axis_index(MODEL) * width
    mine = (cols >= lo) & (cols < lo + width)
    return mine, jnp.where(mine, cols - lo, 0)


@functools.cache
def _ops(mesh: Mesh):
    """The shard_map'd selection and the fused sparse decode (with VJP) for ``mesh`` (cached)."""
    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

    def select(params, x_n, dead_mask, any_dead, *, spec, k, k_aux, recall, chunk):
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

            # local selections per row block (no collectives inside the loop), then one
            # exact merge over the model axis for the whole local batch
            def body(_, xb):
                pre = pre_activations(s, xb)  # [blk, width]
                top = fast.select_topk(pre, min(k, width), recall=recall, chunk=chunk)

                def aux(pre):
                    v, i = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), min(k_aux, width))
                    return v, i.astype(jnp.int32)

                def no_aux(pre):
                    return (jnp.full((pre.shape[0], min(k_aux, width)), -jnp.inf, pre.dtype),
                            jnp.zeros((pre.shape[0], min(k_aux, width)), jnp.int32))

                return None, (*top, *jax.lax.cond(any_dead, aux, no_aux, pre))

            _, out = jax.lax.scan(body, None, x.reshape(n // blk, blk, d))
            v, i, av, ai = (o.reshape(n, o.shape[-1]) for o in out)
            return (*merge_model_topk(v, i, k, width), *merge_model_topk(av, ai, k_aux, width))

        p = jax.lax.stop_gradient(params)
        v, i, av, ai = local(p["W_enc"], p["b_enc"], p["b_dec"], jax.lax.stop_gradient(x_n),
                             dead_mask, any_dead)
        return (v, i), (av, ai)

    # ---- both decodes and their sparse backward, as one op ---------------------------------
    # x_part = sum_j codes[j] W_dec[cols[j]] (main codes, no bias) and e_hat (AuxK codes) with
    # a VJP that also gives the encoder's gradients (codes = relu(pre[r, cols]) were selected
    # from W_enc, b_enc, b_dec).  One op, so that the main and AuxK gradients are added on
    # each device before a single all-reduce over data, and so that no collective sits inside
    # a lax.cond (AuxK is skipped with a local cond; XLA:CPU crashed intermittently on
    # collectives inside a differentiated cond).
    def decode_part(codes, cols, w_dec):
        mine, lc = _owned(cols, w_dec.shape[0])
        return fast._decode_fwd_impl(jnp.where(mine, codes, 0.0), None, lc, w_dec,
                                     codes.shape[1])

    @functools.partial(smap, in_specs=(SLABS, SLABS, SLABS, SLABS, P(MODEL, None), P()),
                       out_specs=(ROWS, ROWS))
    def decode_local(codes, cols, acodes, acols, w_dec, any_dead):
        x_part = decode_part(codes, cols, w_dec)
        e_part = jax.lax.cond(any_dead, lambda: decode_part(acodes, acols, w_dec),
                              lambda: jnp.zeros_like(x_part))
        return jax.lax.psum(x_part, MODEL), jax.lax.psum(e_part, MODEL)

    def local_grads(codes, cols, g, x_n, w_dec, w_enc, b_enc, b_dec):
        """(dW_dec, dW_enc, db_enc) of this shard's latents from this shard's rows."""
        mine, lc = _owned(cols, w_dec.shape[0])
        res = (jnp.where(mine, codes, 0.0), None, lc, w_dec)
        d_codes, _, _, dw_dec = fast._decode_bwd(codes.shape[1], res, g)
        d_pre = jnp.where(mine & (codes > 0), d_codes, 0.0)  # through relu, owned only
        grads = fast._hook_bwd((None, lc, x_n, b_dec, w_enc, b_enc), d_pre)  # dx: dropped
        return dw_dec, grads[5], grads[6]

    @functools.partial(
        smap,
        in_specs=(SLABS, SLABS, SLABS, SLABS, ROWS, P(), P(MODEL, None), P(None, MODEL),
                  P(MODEL), P(), ROWS, ROWS),
        out_specs=(P(MODEL, None), P(None, MODEL), P(MODEL), P()),
    )
    def grads_local(codes, cols, acodes, acols, x_n, any_dead, w_dec, w_enc, b_enc, b_dec,
                    gx, ge):
        params = (x_n, w_dec, w_enc, b_enc, b_dec)
        main = local_grads(codes, cols, gx, *params)
        aux = jax.lax.cond(any_dead, lambda: local_grads(acodes, acols, ge, *params),
                           lambda: jax.tree.map(jnp.zeros_like, main))
        dw_dec, dw_enc, db_enc = (jax.lax.psum(a + b, DATA) for a, b in zip(main, aux))
        db_dec = -jax.lax.psum(w_enc.astype(jnp.float32) @ db_enc.astype(jnp.float32), MODEL)
        return dw_dec, dw_enc, db_enc, db_dec.astype(b_dec.dtype)

    @jax.custom_vjp
    def decode(codes, cols, acodes, acols, x_n, any_dead, w_dec, w_enc, b_enc, b_dec):
        return decode_local(codes, cols, acodes, acols, w_dec, any_dead)

    def decode_fwd(codes, cols, acodes, acols, x_n, any_dead, w_dec, w_enc, b_enc, b_dec):
        out = decode_local(codes, cols, acodes, acols, w_dec, any_dead)
        return out, (codes, cols, acodes, acols, x_n, any_dead, w_dec, w_enc, b_enc, b_dec)

    def decode_bwd(res, cot):
        codes, cols, acodes, acols, x_n = res[:5]
        dw_dec, dw_enc, db_enc, db_dec = grads_local(*res, *cot)
        return (jnp.zeros_like(codes), None, jnp.zeros_like(acodes), None, jnp.zeros_like(x_n),
                None, dw_dec, dw_enc, db_enc, db_dec)

    decode.defvjp(decode_fwd, decode_bwd)
    return select, decode


def sharded_fast_sae_loss(
    sae: SAE,
    x_n: Array,
    mesh: Mesh,
    *,
    dead_mask: Array | None = None,
    aux_coef: float = 1.0 / 32.0,
    x_target: Array | None = None,
) -> tuple[Array, dict]:
    """`jsae.sae.fast.fast_sae_loss` (TopK) with latents split over ``mesh``'s model axis.

    Same terms and gradients as the single-device paths; ``aux["z"]`` is a
    `jsae.sae.fast.SparseCodes` with slabs ``[k, B]``.  AuxK always uses the sparse decoder.
    """
    spec, p = sae.spec, sae.params
    if dead_mask is None:
        dead_mask = jnp.zeros((spec.d_sae,), bool)
    select, decode = _ops(mesh)
    any_dead = jnp.any(dead_mask)
    (v, i), (av, ai) = select(p, x_n, dead_mask, any_dead, spec=spec, k=get_arch(spec.architecture).code_k(spec),
                              k_aux=spec.aux_k_resolved, recall=spec.topk_recall,
                              chunk=spec.topk_chunk)
    codes, cols = jax.nn.relu(v.T), i.T  # the selection carries no gradient itself
    acodes = jnp.where(jnp.isfinite(av.T), jax.nn.relu(av.T), 0.0)
    x_part, e_hat = decode(codes, cols, acodes, ai.T, jax.lax.stop_gradient(x_n), any_dead,
                           p["W_dec"], p["W_enc"], p["b_enc"], p["b_dec"])
    x_hat = x_part + p["b_dec"]
    target = x_n if x_target is None else x_target
    recon = jnp.sum((x_hat - target) ** 2, axis=-1).mean()
    residual = jax.lax.stop_gradient(target - x_hat)
    aux_loss = jnp.where(any_dead, jnp.sum((e_hat - residual) ** 2, axis=-1).mean(), 0.0)
    terms = {"recon": recon, "auxk": aux_coef * aux_loss}
    z = fast.SparseCodes(codes, None, cols, x_n.shape[0], spec.d_sae)
    return sum(terms.values()), {**terms, "z": z, "x_hat": x_hat}


__all__ = ["applies", "sharded_fast_sae_loss"]

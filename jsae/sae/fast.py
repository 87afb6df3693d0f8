"""Fast path for TopK and BatchTopK training: sparse decoder and sparse encoder backward.

The reference path (`jsae.sae.losses.sae_loss`) builds dense codes ``z [B, d_sae]`` and pays
for three dense ``[B, d_sae] x d_in`` matmuls after the encoder (decoder forward, decoder
backward for ``dW_dec`` and ``dz``, encoder backward ``dW_enc = xc^T dpre``).  Only ``k``
entries per row are non-zero, so this module keeps the codes sparse:

- ``SparseCodes(vals, rows, cols)``: COO codes laid out as ``m`` slabs of ``c`` entries
  (``[m, c]`` each).  TopK uses ``m = k`` slabs of ``c = B`` entries where slab ``j`` holds the
  j-th largest latent of every row (``rows is None`` then means ``rows[j] = arange(B)``);
  BatchTopK uses ``k * B`` (row, latent) pairs in ``k`` slabs of ``B``.
- `select_latents`: for TopK, the encoder matmul, the per-row top-k and AuxK's selection run
  over row blocks (`ENCODE_BLOCK_ROWS`), so no ``[B, d_sae]`` array is held (this is what
  lets ~2M latents fit one 80 GB device at d_in 768, see `jsae plan`).
- `sparse_decode` (custom VJP): ``x_hat[r] = sum vals * W_dec[col]``, a few gathered slabs per
  loop iteration; its backward gives ``d_vals`` by gathered dots and scatter-adds into only
  the active rows of ``dW_dec``.
- `encoder_hook` (custom VJP): identity on the selected pre-activations; its backward turns
  their cotangents into ``dW_enc`` (scatter-add into the active columns), ``db_enc``
  (segment sum) and ``db_dec = -W_enc db_enc``, never forming a dense ``[B, d_sae]`` gradient.

Work per step after the encoder matmul drops from ``3 * 2 B d_sae d_in`` FLOPs to
``~4 * 2 B k d_in`` (gathers and scatter-adds), which is what makes the step faster on CPU;
on GPU/TPU the same formulation removes the three big matmuls from the roofline.  Values
and gradients equal the reference path's within float32 rounding (same ``lax.top_k``
selection, so ties go to the lower latent index in both).  Sparse parts always compute in
float32; ``spec.dtype="bfloat16"`` only changes the encoder matmul.

The fast path is used by `sae_loss` when ``spec.fast_path`` is true, the architecture has
one (`jsae.sae.archs`: topk, batchtopk, matryoshka), and the latents are not split over a mesh's ``model`` axis.  With ``model > 1``
TopK takes `jsae.sae.fast_sharded` (the same sparse pieces with explicit collectives) and
BatchTopK the reference path with the exact sharded batch-wide selection of
`jsae.parallel.sharded_batch_topk_fn`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from jsae.sae.archs import get_arch
from jsae.sae.core import SAE, pre_activations
from jsae.sae.selection import batch_top_k, chunked_top_k, select_topk
from jsae.sae.spec import mm as _mm

Array = jax.Array

# AuxK uses the sparse decoder when aux_k is at most d_sae / this: gathers and scatter-adds
# cost far more per multiply-add than a dense matmul (about 30-60x on CPU), so for a large
# aux_k relative to d_sae the dense AuxK decoder is faster.
AUXK_SPARSE_RATIO = 48


@struct.dataclass
class SparseCodes:
    """COO latent codes in ``m`` slabs of ``c`` entries (see the module docstring).

    vals [m, c] float32 (the codes, already rectified), rows [m, c] int32 or None (row of each
    entry; None: slab j covers rows 0..c-1 in order), cols [m, c] int32 (latent index),
    n_rows (static) and d_sae (static).
    """

    vals: Array
    rows: Array | None
    cols: Array
    n_rows: int = struct.field(pytree_node=False)
    d_sae: int = struct.field(pytree_node=False)

    def dense(self) -> Array:
        """The dense codes ``z [n_rows, d_sae]`` (for tests and small batches)."""
        rows = _rows(self)
        z = jnp.zeros((self.n_rows, self.d_sae), self.vals.dtype)
        return z.at[rows.reshape(-1), self.cols.reshape(-1)].add(self.vals.reshape(-1))


def _rows(codes: SparseCodes) -> Array:
    if codes.rows is not None:
        return codes.rows
    m, c = codes.cols.shape
    return jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (m, c))


# ---- selection ----------------------------------------------------------------------------


def topk_codes(pre: Array, k: int, *, recall: float = 1.0, rectify: bool = True,
               chunk: int = 0) -> SparseCodes:
    """TopK codes of ``pre [B, d_sae]``: relu of each row's k largest entries (no gradient).

    ``rectify=False`` keeps the raw pre-activation values.
    """
    vals, idx = select_topk(pre, k, recall=recall, chunk=chunk)
    vals = jax.nn.relu(vals) if rectify else vals
    return SparseCodes(vals.T, None, idx.T.astype(jnp.int32), pre.shape[0], pre.shape[1])


# BatchTopK's two-stage selection (`batch_top_k`) keeps this many candidates per row (times k)
# before the batch-wide top-k, falling back to one flat top-k when a row may hold more.  Off
# (None: one flat top-k) because on XLA:CPU the program with the lax.cond fallback ran at
# 6.6-11 s against 0.6 s without it and 2.2 s for the flat top-k (B=4096, d_sae=12288, k=64):
# the untaken branch is not free there.  Worth measuring on GPU/TPU.
BATCH_TOPK_CANDIDATES: int | None = None


def batch_topk_codes(pre: Array, k: int) -> SparseCodes:
    """BatchTopK codes: the k * B largest entries of relu(pre) over the whole batch."""
    b, f = pre.shape
    acts = jax.nn.relu(jax.lax.stop_gradient(pre))
    n_keep = min(k * b, b * f)
    per_row = None if BATCH_TOPK_CANDIDATES is None else BATCH_TOPK_CANDIDATES * k
    vals, rows, cols = batch_top_k(acts, n_keep, per_row)
    m, c = _slabs(n_keep, b)
    return SparseCodes(vals.reshape(m, c), rows.reshape(m, c), cols.reshape(m, c), b, f)


def _slabs(n: int, preferred: int) -> tuple[int, int]:
    """Split n entries into m slabs of c (c divides n, as close to ``preferred`` as possible)."""
    c = min(preferred, n)
    while n % c:
        c -= 1
    return n // c, c


# ---- the sparse decoder ------------------------------------------------------------------


def sparse_decode(codes: SparseCodes, w_dec: Array) -> Array:
    """``codes @ W_dec`` -> [n_rows, d_in] without forming dense codes (no bias)."""
    return _sparse_decode(codes.vals, codes.rows, codes.cols, w_dec, codes.n_rows)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sparse_decode(vals, rows, cols, w_dec, n_rows):
    return _decode_fwd_impl(vals, rows, cols, w_dec, n_rows)


# Slabs handled per loop iteration, by backend: for the loops that scatter-add into
# [d_sae, d_in] gradients (SCATTER_...) and for the decoder's gather-only forward (GATHER_...).
# Measured on the shared 2-core CPU at B=4096, k=64, d_in=768, d_sae=12288 (load ~5): the
# scatter loops run fastest one slab at a time (decoder backward 0.55 s vs 0.75 s with 8),
# the forward fastest 8 slabs at a time, unrolled (60 ms vs 125 ms).  GPU/TPU values are a
# first guess (not measured yet: tune with benchmarks/sae_step.py on the device).
SCATTER_SLABS_PER_STEP = {"cpu": 1, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}
GATHER_SLABS_PER_STEP = {"cpu": 8, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}


def _group(m: int, table: dict[str, int]) -> int:
    g = max(1, min(table.get(jax.default_backend(), 8), m))
    while m % g:
        g -= 1
    return g


def _scan_slabs(body, init, *slabs, table=None):
    """``lax.scan`` over groups of slabs: each ``[m, c]`` array is fed as ``[g, c]`` blocks.

    ``None`` entries stay None.  Returns (carry, stacked outputs reshaped back to [m, ...]).
    """
    m = next(x for x in slabs if x is not None).shape[0]
    g = _group(m, SCATTER_SLABS_PER_STEP if table is None else table)
    present = [x.reshape(m // g, g, *x.shape[1:]) for x in slabs if x is not None]

    def step(carry, xs):
        it = iter(xs)
        return body(carry, *[None if x is None else next(it) for x in slabs])

    carry, ys = jax.lax.scan(step, init, tuple(present))
    if ys is not None:
        ys = jax.tree.map(lambda y: y.reshape(m, *y.shape[2:]), ys)
    return carry, ys


def _rows_of(x: Array, r: Array | None) -> Array:
    """Rows ``r [g, c]`` of ``x [n, d]`` as [g, c, d]; r None means rows 0..c-1 ([1, c, d])."""
    return x[None] if r is None else x[r]


def _decode_fwd_impl(vals, rows, cols, w_dec, n_rows):
    d = w_dec.shape[1]
    w = w_dec.astype(jnp.float32)

    def body(acc, v, r, c):
        if r is None:  # unrolled over the group: each gather fuses into its multiply-add
            for j in range(c.shape[0]):
                acc = acc + v[j][:, None] * w[c[j]]
            return acc, None
        return acc.at[r.reshape(-1)].add((v[..., None] * w[c]).reshape(-1, d)), None

    acc0 = jnp.zeros((n_rows, d), jnp.float32)
    table = GATHER_SLABS_PER_STEP if rows is None else SCATTER_SLABS_PER_STEP
    return _scan_slabs(body, acc0, vals, rows, cols, table=table)[0]


def _decode_fwd(vals, rows, cols, w_dec, n_rows):
    return _decode_fwd_impl(vals, rows, cols, w_dec, n_rows), (vals, rows, cols, w_dec)


def _decode_bwd(n_rows, res, g):
    vals, rows, cols, w_dec = res
    d = w_dec.shape[1]
    w = w_dec.astype(jnp.float32)
    g = g.astype(jnp.float32)

    def body(dw, v, r, c):
        gr = _rows_of(g, r)  # [g|1, c, d]
        if r is None:  # unrolled gathered dots (fused), one scatter-add for the whole group
            d_v = jnp.stack([jnp.sum(g * w[c[j]], axis=-1) for j in range(c.shape[0])])
        else:
            d_v = jnp.sum(gr * w[c], axis=-1)
        return dw.at[c.reshape(-1)].add((v[..., None] * gr).reshape(-1, d)), d_v

    dw, d_vals = _scan_slabs(body, jnp.zeros(w.shape, jnp.float32), vals, rows, cols)
    return d_vals.astype(vals.dtype), None, None, dw.astype(w_dec.dtype)


_sparse_decode.defvjp(_decode_fwd, _decode_bwd)


# ---- the sparse encoder backward --------------------------------------------------------


def encoder_hook(codes: SparseCodes, pre_vals: Array, x_n: Array, params: dict) -> Array:
    """Differentiable selected pre-activations.

    ``pre_vals [m, c]`` must equal ``pre[rows, cols]`` with ``pre = (x_n - b_dec) W_enc + b_enc``
    (computed without gradient).  Returns ``pre_vals`` unchanged; its VJP gives the exact
    gradients of W_enc, b_enc, b_dec (and x_n) that the dense encoder would give for a
    cotangent that is zero outside the selected entries.
    """
    return _encoder_hook(
        pre_vals, codes.rows, codes.cols, x_n, params["b_dec"], params["W_enc"], params["b_enc"]
    )


@jax.custom_vjp
def _encoder_hook(pre_vals, rows, cols, x_n, b_dec, w_enc, b_enc):
    del rows, cols, x_n, b_dec, w_enc, b_enc
    return pre_vals


def _hook_fwd(pre_vals, rows, cols, x_n, b_dec, w_enc, b_enc):
    return pre_vals, (rows, cols, x_n, b_dec, w_enc, b_enc)


def _hook_bwd(res, d_vals):
    rows, cols, x_n, b_dec, w_enc, b_enc = res
    d_in, d_sae = w_enc.shape
    d_vals = d_vals.astype(jnp.float32)
    xc = (x_n - b_dec).astype(jnp.float32)
    w_t = w_enc.T.astype(jnp.float32)  # [d_sae, d_in]; dropped by XLA unless dx is needed

    def body(dw_t, dv, r, c):
        upd = dv[..., None] * _rows_of(xc, r)
        return dw_t.at[c.reshape(-1)].add(upd.reshape(-1, d_in)), None

    def body_dx(dx, dv, r, c):  # a separate loop: XLA drops it when x_n needs no gradient
        contrib = dv[..., None] * w_t[c]
        if r is None:
            return dx + jnp.sum(contrib, axis=0), None
        return dx.at[r.reshape(-1)].add(contrib.reshape(-1, d_in)), None

    dw_t = _scan_slabs(body, jnp.zeros((d_sae, d_in), jnp.float32), d_vals, rows, cols)[0]
    dx = _scan_slabs(body_dx, jnp.zeros(x_n.shape, jnp.float32), d_vals, rows, cols)[0]
    db_enc = jnp.zeros((d_sae,), jnp.float32).at[cols.reshape(-1)].add(d_vals.reshape(-1))
    db_dec = -(w_enc.astype(jnp.float32) @ db_enc)
    return (
        jnp.zeros_like(d_vals), None, None, dx.astype(x_n.dtype), db_dec.astype(b_dec.dtype),
        dw_t.T.astype(w_enc.dtype), db_enc.astype(b_enc.dtype),
    )


_encoder_hook.defvjp(_hook_fwd, _hook_bwd)


# ---- statistics of codes (dense z or SparseCodes) ------------------------------------------


def l0(z) -> Array:
    """Mean number of active latents per row."""
    if isinstance(z, SparseCodes):
        return jnp.sum(z.vals > 0).astype(jnp.float32) / z.n_rows
    return jnp.mean(jnp.sum(z > 0, axis=-1).astype(jnp.float32))


def fired(z) -> Array:
    """[d_sae] bool: which latents were active in any row."""
    if isinstance(z, SparseCodes):
        return jnp.zeros((z.d_sae,), bool).at[z.cols.reshape(-1)].max(z.vals.reshape(-1) > 0)
    return jnp.any(z > 0, axis=0)


def min_positive(z) -> Array:
    """Smallest positive code (inf when none)."""
    v = z.vals if isinstance(z, SparseCodes) else z
    return jnp.min(jnp.where(v > 0, v, jnp.inf))


# ---- the loss -----------------------------------------------------------------------------


def fast_applies(sae: SAE, topk_fn=None, batch_topk_fn=None) -> bool:
    """Whether `sae_loss` routes this SAE through the (single latent shard) fast path.

    Only for architectures with one (`Arch.supports_fast`); not with a sharded top-k (latents
    split over ``model``: see `jsae.sae.fast_sharded`), and not where the architecture
    declines the sharded batch-wide selection (BatchTopK with latents split over ``model``,
    whose flat top-k here would gather the whole batch's pre-activations on every device).
    """
    spec = sae.spec
    if not getattr(spec, "fast_path", False) or topk_fn is not None:
        return False
    arch = get_arch(spec.architecture)
    return arch.supports_fast and arch.fast_applies(batch_topk_fn)


# Rows of pre-activations alive at once in the fast TopK path: the encoder matmul, the
# top-k and AuxK's selection run over row blocks, so no [B, d_sae] array is ever held (this
# is what lets a big dictionary fit; the matmul per block is still large enough to be fast).
ENCODE_BLOCK_ROWS = 1024


def _block_rows(n: int) -> int:
    b = max(1, min(ENCODE_BLOCK_ROWS, n))
    while n % b:
        b -= 1
    return b


def select_latents(
    sae: SAE, x_n: Array, dead_mask: Array, *, k: int, k_aux: int, recall: float = 1.0,
    chunk: int = 0,
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Per-row top-k of the pre-activations and AuxK's top-k_aux among dead latents.

    Computed block by block over rows (`ENCODE_BLOCK_ROWS`), without gradient.  Returns
    ``((vals [B, k], idx [B, k]), (aux_vals [B, k_aux], aux_idx [B, k_aux]))`` with raw
    pre-activation values; AuxK's values are -inf where fewer than k_aux latents are dead and
    everywhere when none is (its selection is then skipped).
    """
    params = jax.lax.stop_gradient(sae.params)
    s = sae.replace(params=params)
    n, d = x_n.shape
    blk = _block_rows(n)
    any_dead = jnp.any(dead_mask)

    def body(_, xb):
        pre = pre_activations(s, xb)
        top = select_topk(pre, k, recall=recall, chunk=chunk)

        def aux(pre):
            v, i = jax.lax.top_k(jnp.where(dead_mask, pre, -jnp.inf), k_aux)
            return v, i.astype(jnp.int32)

        def no_aux(pre):
            return (jnp.full((pre.shape[0], k_aux), -jnp.inf, pre.dtype),
                    jnp.zeros((pre.shape[0], k_aux), jnp.int32))

        return None, (top[0], top[1].astype(jnp.int32), *jax.lax.cond(any_dead, aux, no_aux, pre))

    _, out = jax.lax.scan(body, None, jax.lax.stop_gradient(x_n).reshape(n // blk, blk, d))
    v, i, av, ai = (o.reshape(n, o.shape[-1]) for o in out)
    return (v, i), (av, ai)


def sparse_codes(sae: SAE, pre: Array, x_n: Array) -> SparseCodes:
    """Training codes of a fast-path SAE from ``pre`` (no gradient through ``pre``),
    differentiable w.r.t. the SAE's parameters."""
    return _differentiable(sae, get_arch(sae.spec.architecture).fast_codes(sae, pre), x_n)


def _differentiable(sae: SAE, sel: SparseCodes, x_n: Array) -> SparseCodes:
    vals = jax.nn.relu(encoder_hook(sel, sel.vals, x_n, sae.params))
    return sel.replace(vals=vals)


def fast_auxk_loss(
    sae: SAE, aux_sel: tuple[Array, Array], x_n: Array, residual: Array, dead_mask: Array
) -> Array:
    """`jsae.sae.losses.auxk_loss` from AuxK's selection ``(vals [B, k_aux], idx)`` (raw
    pre-activations of dead latents, -inf where none), with the sparse decoder and sparse
    encoder backward when aux_k is small next to d_sae."""
    spec = sae.spec
    use_sparse = spec.aux_k_resolved * AUXK_SPARSE_RATIO <= spec.d_sae

    def compute(operands):
        (sel_vals, idx), residual, x_n, params = operands
        ok = jnp.isfinite(sel_vals)
        if use_sparse:
            codes = SparseCodes(jnp.where(ok, sel_vals, 0.0).T, None, idx.T, x_n.shape[0],
                                spec.d_sae)
            v = encoder_hook(codes, codes.vals, x_n, params)
            codes = codes.replace(vals=jnp.where(ok.T, jax.nn.relu(v), 0.0))
            e_hat = sparse_decode(codes, params["W_dec"])
        else:  # dense AuxK decoder (as the reference), encoder recomputed for its gradient
            live = pre_activations(sae.replace(params=params), x_n)
            v = jnp.where(ok, jax.nn.relu(jnp.take_along_axis(live, idx, axis=1)), 0.0)
            rows = jnp.arange(x_n.shape[0])[:, None]
            z_aux = jnp.zeros_like(live).at[rows, idx].set(v)
            e_hat = _mm(z_aux, params["W_dec"], spec.compute_dtype)
        return jnp.sum((e_hat - jax.lax.stop_gradient(residual)) ** 2, axis=-1).mean()

    return jax.lax.cond(
        jnp.any(dead_mask), compute, lambda _: jnp.zeros((), jnp.float32),
        (jax.lax.stop_gradient(aux_sel), residual, x_n, sae.params),
    )


def _top_k_tuple(x: Array, k: int) -> tuple[Array, Array]:
    v, i = jax.lax.top_k(x, k)
    return v, i.astype(jnp.int32)


def fast_sae_loss(
    sae: SAE,
    x_n: Array,
    *,
    dead_mask: Array | None = None,
    aux_coef: float = 1.0 / 32.0,
    x_target: Array | None = None,
) -> tuple[Array, dict]:
    """`sae_loss` on the fast path (architectures with `Arch.supports_fast`).

    Same loss terms and gradients as the reference; ``aux["z"]`` is a `SparseCodes` instead of
    a dense array (use `l0`, `fired`, `min_positive`, or ``.dense()``), and there is no
    ``aux["pre"]`` for topk (its pre-activations are never held whole).
    """
    spec, p = sae.spec, sae.params
    if dead_mask is None:
        dead_mask = jnp.zeros((spec.d_sae,), bool)
    k_aux = spec.aux_k_resolved
    extra = {}
    target = x_n if x_target is None else x_target
    if get_arch(spec.architecture).fast_blockwise:  # topk
        (v, i), aux_sel = select_latents(sae, x_n, dead_mask, k=get_arch(spec.architecture).code_k(spec), k_aux=k_aux,
                                         recall=spec.topk_recall, chunk=spec.topk_chunk)
        codes = _differentiable(sae, SparseCodes(v.T, None, i.T, x_n.shape[0], spec.d_sae), x_n)
    else:
        pre = jax.lax.stop_gradient(pre_activations(sae, x_n))
        codes = sparse_codes(sae, pre, x_n)
        aux_sel = jax.lax.cond(
            jnp.any(dead_mask),
            lambda pre: _top_k_tuple(jnp.where(dead_mask, pre, -jnp.inf), k_aux),
            lambda pre: (jnp.full((pre.shape[0], k_aux), -jnp.inf, pre.dtype),
                         jnp.zeros((pre.shape[0], k_aux), jnp.int32)),
            pre,
        )
        extra["pre"] = pre
    x_hat = sparse_decode(codes, p["W_dec"]) + p["b_dec"]
    arch = get_arch(spec.architecture)
    auxk = fast_auxk_loss(sae, aux_sel, x_n, target - x_hat, dead_mask)
    terms = {"recon": arch.recon_loss(sae, x_hat, target),
             **arch.fast_extra_terms(sae, codes, target), "auxk": aux_coef * auxk}
    loss = sum(terms.values())
    return loss, {**terms, "z": codes, "x_hat": x_hat, **extra}


__all__ = [
    "SparseCodes", "batch_top_k", "batch_topk_codes", "chunked_top_k", "encoder_hook", "fast_applies",
    "fast_auxk_loss", "fast_sae_loss", "fired", "l0", "min_positive", "select_latents",
    "select_topk",
    "sparse_codes", "sparse_decode", "topk_codes",
]

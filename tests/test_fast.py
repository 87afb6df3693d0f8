"""The fast path (jsae.sae.fast) equals the reference path: values, gradients, train steps."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsae.sae import SAESpec, fast, init_sae, sae_loss
from jsae.train.state import init_state
from jsae.train.step import make_train_step

D_IN, D_SAE, B = 12, 48, 20


def _sae(arch, k, *, d_sae=D_SAE, aux_k=None, seed=0, dtype="float32", ties=False):
    spec = SAESpec(arch, D_IN, d_sae, k=k, aux_k=aux_k, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D_IN)).astype(np.float32)
    sae = init_sae(jax.random.key(seed), spec, x)
    p = dict(sae.params)
    p["b_enc"] = p["b_enc"] + 0.2 * jnp.asarray(rng.normal(size=(d_sae,)), jnp.float32)
    if ties:  # pairs of identical latents: every pre-activation value appears twice
        half = d_sae // 2
        p["W_enc"] = jnp.concatenate([p["W_enc"][:, :half]] * 2, axis=1)
        p["b_enc"] = jnp.concatenate([p["b_enc"][:half]] * 2)
    if arch == "batchtopk":
        p["threshold"] = jnp.full((d_sae,), 0.05, jnp.float32)
    return sae.replace(params=p), x


def _with_fast(sae, on=True):
    return sae.replace(spec=dataclasses.replace(sae.spec, fast_path=on))


def _loss_and_grads(sae, x, dead, aux_coef=0.5):
    def f(params):
        s = sae.replace(params=params)
        return sae_loss(s, jnp.asarray(x) * s.norm_scale, sparsity_coef=0.0, dead_mask=dead,
                        aux_coef=aux_coef)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(sae.params)


def _assert_same(ref, got, rtol=2e-5, atol=2e-5):
    (l_r, a_r), g_r = ref
    (l_f, a_f), g_f = got
    np.testing.assert_allclose(float(l_f), float(l_r), rtol=rtol, atol=atol)
    for term in ("recon", "auxk"):
        np.testing.assert_allclose(float(a_f[term]), float(a_r[term]), rtol=rtol, atol=atol)
    assert isinstance(a_f["z"], fast.SparseCodes)
    np.testing.assert_allclose(np.asarray(a_f["z"].dense()), np.asarray(a_r["z"]), atol=atol)
    np.testing.assert_allclose(np.asarray(a_f["x_hat"]), np.asarray(a_r["x_hat"]), atol=atol)
    assert set(g_f) == set(g_r)
    for name in g_r:
        scale = max(float(jnp.abs(g_r[name]).max()), 1.0)
        np.testing.assert_allclose(np.asarray(g_f[name]), np.asarray(g_r[name]),
                                   atol=atol * scale, rtol=rtol, err_msg=name)


CASES = [
    # arch, k, d_sae, ties, aux: AuxK off ("none") or on with its sparse / dense decoder,
    # group: slabs per loop iteration (1 on CPU; GPU/TPU use more)
    ("topk", 4, D_SAE, False, "none", 1),
    ("topk", 4, D_SAE, True, "sparse", 1),  # exact ties: both paths keep the lower latent index
    ("topk", D_SAE - 1, D_SAE, False, "dense", 1),  # k near d_sae
    ("topk", D_SAE, D_SAE, False, "sparse", 4),  # k == d_sae
    ("batchtopk", 3, D_SAE, False, "dense", 1),
    ("batchtopk", 3, D_SAE, True, "sparse", 3),
    ("batchtopk", D_SAE - 2, D_SAE, False, "none", 8),
]


@pytest.mark.parametrize("arch,k,d_sae,ties,aux,group", CASES)
def test_fast_loss_and_grads_equal_reference(arch, k, d_sae, ties, aux, group, monkeypatch):
    sae, x = _sae(arch, k, d_sae=d_sae, aux_k=6, ties=ties)
    dead = jnp.zeros((d_sae,), bool) if aux == "none" else (jnp.arange(d_sae) % 3 == 0)
    # which AuxK decoder the fast path takes: sparse when aux_k * ratio <= d_sae
    monkeypatch.setattr(fast, "AUXK_SPARSE_RATIO", 1 if aux == "sparse" else 10**9)
    monkeypatch.setitem(fast.SCATTER_SLABS_PER_STEP, "cpu", group)
    monkeypatch.setitem(fast.GATHER_SLABS_PER_STEP, "cpu", group)
    if group > 1:  # also select top-k in row blocks (5 rows each: 4 blocks of the batch)
        monkeypatch.setattr(fast, "ENCODE_BLOCK_ROWS", 8)
    ref = _loss_and_grads(sae, x, dead)
    got = _loss_and_grads(_with_fast(sae), x, dead)
    assert not isinstance(ref[0][1]["z"], fast.SparseCodes)
    if aux != "none":
        assert float(ref[0][1]["auxk"]) > 0
    _assert_same(ref, got)


def test_ties_really_tie():
    sae, x = _sae("topk", 5, ties=True)
    from jsae.sae.core import pre_activations

    pre = np.asarray(pre_activations(sae, jnp.asarray(x) * sae.norm_scale))
    np.testing.assert_array_equal(pre[:, : D_SAE // 2], pre[:, D_SAE // 2:])
    cols = np.asarray(fast.topk_codes(jnp.asarray(pre), 5).cols).T  # [B, 5]
    half = D_SAE // 2
    for row in cols:  # pairs come whole; the odd fifth pick is the lower index of its pair
        lower, upper = set(row[row < half]), set(row[row >= half] - half)
        assert upper < lower and len(lower) == 3
    ref = np.asarray(jax.lax.top_k(jnp.asarray(pre), 5)[1])
    np.testing.assert_array_equal(np.sort(cols, -1), np.sort(ref, -1))


@pytest.mark.parametrize("group", [1, 2])
def test_sparse_decode_matches_numpy_and_its_vjp(group, monkeypatch):
    monkeypatch.setitem(fast.SCATTER_SLABS_PER_STEP, "cpu", group)
    monkeypatch.setitem(fast.GATHER_SLABS_PER_STEP, "cpu", group)
    rng = np.random.default_rng(1)
    n, f, d, k = 7, 30, 5, 4
    w = rng.normal(size=(f, d)).astype(np.float32)
    idx = np.stack([rng.choice(f, k, replace=False) for _ in range(n)]).astype(np.int32)
    vals = rng.normal(size=(n, k)).astype(np.float32)
    z = np.zeros((n, f), np.float32)
    z[np.arange(n)[:, None], idx] = vals
    g = rng.normal(size=(n, d)).astype(np.float32)
    for rows in (None, "explicit"):
        r = None if rows is None else jnp.asarray(np.tile(np.arange(n, dtype=np.int32), (k, 1)))
        codes = fast.SparseCodes(jnp.asarray(vals.T), r, jnp.asarray(idx.T), n, f)
        np.testing.assert_allclose(np.asarray(codes.dense()), z, atol=1e-6)

        def dec(v, w_, codes=codes):
            return fast.sparse_decode(codes.replace(vals=v), w_)

        out, vjp = jax.vjp(dec, jnp.asarray(vals.T), jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(out), z @ w, rtol=1e-5, atol=1e-5)
        d_v, d_w = vjp(jnp.asarray(g))
        np.testing.assert_allclose(np.asarray(d_w), z.T @ g, rtol=1e-5, atol=1e-5)  # dense dW_dec
        np.testing.assert_allclose(np.asarray(d_v).T, np.einsum("nd,nkd->nk", g, w[idx]),
                                   rtol=1e-5, atol=1e-5)


def test_encoder_hook_gradients_match_dense_encoder_including_input():
    sae, x = _sae("topk", 4)
    x_n = jnp.asarray(x) * sae.norm_scale
    from jsae.sae.core import pre_activations

    pre = pre_activations(sae, x_n)
    codes = fast.topk_codes(pre, 4, rectify=False)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=codes.vals.shape), jnp.float32)

    def via_hook(params, x_n):
        return jnp.sum(fast.encoder_hook(codes, codes.vals, x_n, params) * cot)

    def via_dense(params, x_n):
        pre = pre_activations(sae.replace(params=params), x_n)
        return jnp.sum(jnp.take_along_axis(pre, codes.cols.T, axis=1).T * cot)

    g_hook = jax.grad(via_hook, argnums=(0, 1))(sae.params, x_n)
    g_dense = jax.grad(via_dense, argnums=(0, 1))(sae.params, x_n)
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_allclose(np.asarray(g_hook[0][name]), np.asarray(g_dense[0][name]),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(g_hook[1]), np.asarray(g_dense[1]), rtol=1e-5, atol=1e-5)


def test_code_statistics_match_dense():
    sae, x = _sae("batchtopk", 3)
    pre = jnp.asarray(np.random.default_rng(3).normal(size=(B, D_SAE)), jnp.float32)
    codes = fast.batch_topk_codes(pre, 3)
    z = codes.dense()
    assert float(fast.l0(codes)) == pytest.approx(float(fast.l0(z)))
    np.testing.assert_array_equal(np.asarray(fast.fired(codes)), np.asarray(fast.fired(z)))
    assert float(fast.min_positive(codes)) == float(fast.min_positive(z))
    from jsae.sae.selection import batch_topk

    np.testing.assert_array_equal(np.asarray(z), np.asarray(batch_topk(jax.nn.relu(pre), 3)))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_train_steps_on_fast_path_equal_reference_steps(arch):
    sae, x = _sae(arch, 3, aux_k=4)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    step = jax.jit(make_train_step(opt, optax.constant_schedule(0.0), optax.constant_schedule(1e-2),
                                   dead_after_tokens=3 * B))
    rng = np.random.default_rng(4)
    batches = [jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32) for _ in range(6)]
    out = {}
    for on in (False, True):
        state = init_state(_with_fast(sae, on), opt, jax.random.key(0))
        ms = []
        for xb in batches:  # after 3 batches some latents count as dead: AuxK runs too
            state, m = step(state, xb)
            ms.append(jax.device_get(m))
        out[on] = (state, ms)
    (s_r, m_r), (s_f, m_f) = out[False], out[True]
    assert max(float(m["auxk"]) for m in m_r) > 0
    for a, b in zip(m_r, m_f, strict=True):
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(s_f.fired_ago), np.asarray(s_r.fired_ago))
    for name in s_r.sae.params:
        np.testing.assert_allclose(np.asarray(s_f.sae.params[name]),
                                   np.asarray(s_r.sae.params[name]), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_bfloat16_fast_path_close_to_reference():
    sae, x = _sae("topk", 4, dtype="bfloat16")
    dead = jnp.zeros((D_SAE,), bool)
    (l_r, _), g_r = _loss_and_grads(sae, x, dead)
    (l_f, _), g_f = _loss_and_grads(_with_fast(sae), x, dead)
    np.testing.assert_allclose(float(l_f), float(l_r), rtol=2e-2)
    for name in g_r:
        scale = float(jnp.abs(g_r[name]).max())
        np.testing.assert_allclose(np.asarray(g_f[name]), np.asarray(g_r[name]),
                                   atol=3e-2 * scale, err_msg=name)


def test_approx_topk_option_is_exact_off_tpu():
    pre = jnp.asarray(np.random.default_rng(5).normal(size=(B, D_SAE)), jnp.float32)
    v1, i1 = fast.select_topk(pre, 5)
    v2, i2 = fast.select_topk(pre, 5, recall=0.95)
    np.testing.assert_array_equal(np.sort(np.asarray(i1), -1), np.sort(np.asarray(i2), -1))


def test_fast_path_applies_only_where_it_is_exact():
    sae, _ = _sae("topk", 4)
    assert not fast.fast_applies(sae)
    assert fast.fast_applies(_with_fast(sae))
    assert not fast.fast_applies(_with_fast(sae), topk_fn=lambda p, k: p)  # sharded top-k
    relu, _ = _sae("relu", None)
    assert not fast.fast_applies(_with_fast(relu))


def test_config_fast_path_reaches_the_spec():
    from jsae import config
    from jsae.train.loop import spec_from_config

    cfg = config.from_dict({"sae": {"d_sae": 64, "fast_path": True}, "train": {"steps": 1}})
    assert spec_from_config(cfg, 16).fast_path
    cfg = config.from_dict({"sae": {"d_sae": 64, "fast_path": False}, "train": {"steps": 1}})
    assert not spec_from_config(cfg, 16).fast_path


def test_fast_path_on_a_data_parallel_mesh_equals_one_device(tmp_path):
    """4 simulated devices, mesh data=4 (fast path) vs model=2 (reference, sharded top-k)."""
    code = textwrap.dedent("""
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 4)
        from jsae import config, parallel
        from jsae.data import make_source
        from jsae.train.loop import Trainer
        out = {}
        for data, model, fast in ((4, 1, True), (1, 1, False), (2, 2, True)):
            cfg = config.from_dict({"data": {"source": "synthetic", "d_in": 16, "n_features": 64},
                "sae": {"d_sae": 64, "k": 3, "fast_path": fast, "init_sample": 256,
                        "dead_after_tokens": 64},
                "train": {"steps": 3, "batch_size": 32, "lr": 1e-2}, "seed": 1})
            mesh = parallel.make_mesh(data, model, devices=jax.devices()[: data * model])
            tr = Trainer(cfg, make_source(cfg), mesh=mesh)
            st = tr.init_states()
            for _ in range(3):
                st, m = tr.step(st, tr.source.next_batch(32))
            out[(data, model)] = jax.device_get(st)
        h = list(out[(1, 1)])[0]
        for key in ((4, 1), (2, 2)):
            for n, v in out[(1, 1)][h].sae.params.items():
                np.testing.assert_allclose(out[key][h].sae.params[n], v, rtol=1e-4, atol=1e-5)
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("case", ["spread", "one_row_dominates", "ties", "mostly_zero"])
def test_two_stage_batch_top_k_equals_flat_top_k(case):
    rng = np.random.default_rng(6)
    b, f, k = 16, 64, 3
    a = rng.normal(size=(b, f)).astype(np.float32)
    if case == "one_row_dominates":  # row 0 holds more than per_row of the top: fallback
        a[0] += 100.0
    if case == "ties":
        a = rng.integers(0, 4, size=(b, f)).astype(np.float32)
    if case == "mostly_zero":
        a = np.where(rng.random((b, f)) < 0.97, 0.0, a)
    a = np.maximum(a, 0.0)
    n_keep, per_row = k * b, 4 * k
    v, rows, cols = jax.jit(fast.batch_top_k, static_argnums=(1, 2))(jnp.asarray(a), n_keep,
                                                                      per_row)
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(a).reshape(-1), n_keep)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
    np.testing.assert_array_equal(np.asarray(rows) * f + np.asarray(cols), np.asarray(ref_i))
    if case == "spread":  # the two-stage branch (not the fallback) produced it
        rv = np.sort(a, axis=1)[:, -per_row]
        assert (rv < np.asarray(v)[-1]).all()


@pytest.mark.parametrize("case", ["spread", "ties", "one_chunk_holds_all", "neg_inf"])
def test_chunked_top_k_equals_top_k(case):
    rng = np.random.default_rng(7)
    b, f, k, chunk = 6, 96, 5, 16
    a = rng.normal(size=(b, f)).astype(np.float32)
    if case == "ties":  # few distinct values: ties decided by the lower index
        a = rng.integers(0, 3, size=(b, f)).astype(np.float32)
    if case == "one_chunk_holds_all":  # every winner in one chunk
        a[:, 32:48] += 100.0
    if case == "neg_inf":  # AuxK-style masking: most entries -inf
        a = np.where(rng.random((b, f)) < 0.9, -np.inf, a).astype(np.float32)
    v, i = jax.jit(fast.chunked_top_k, static_argnums=(1, 2))(jnp.asarray(a), k, chunk)
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(a), k)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
    finite = np.isfinite(np.asarray(ref_v))
    np.testing.assert_array_equal(np.asarray(i)[finite], np.asarray(ref_i)[finite])


def test_select_topk_uses_chunks_only_where_they_fit():
    a = jnp.asarray(np.random.default_rng(8).normal(size=(3, 40)), jnp.float32)
    ref = jax.lax.top_k(a, 4)
    for chunk in (0, 3, 4, 8, 40, 64):  # 3: does not divide; 4: not > k; 40/64: >= F
        v, i = fast.select_topk(a, 4, chunk=chunk)
        np.testing.assert_array_equal(np.asarray(i), np.asarray(ref[1]))


def test_chunked_fast_path_equals_reference():
    sae, x = _sae("topk", 4, ties=True)
    dead = jnp.arange(D_SAE) % 3 == 0
    ref = _loss_and_grads(sae, x, dead)
    chunked = sae.replace(spec=dataclasses.replace(sae.spec, fast_path=True, topk_chunk=8))
    _assert_same(ref, _loss_and_grads(chunked, x, dead))


def test_config_topk_chunk_reaches_the_spec_and_rejects_negatives():
    from jsae import config
    from jsae.train.loop import spec_from_config

    cfg = config.from_dict({"sae": {"d_sae": 64, "topk_chunk": 16}, "train": {"steps": 1}})
    assert spec_from_config(cfg, 16).topk_chunk == 16
    with pytest.raises(config.ConfigError, match="sae.topk_chunk"):
        config.from_dict({"sae": {"d_sae": 64, "topk_chunk": -1}, "train": {"steps": 1}})

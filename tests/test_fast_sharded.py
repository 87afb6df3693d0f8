"""The sharded fast TopK path (latents split over ``model``) equals the single-device paths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae import config, parallel
from jsae.plan import plan
from jsae.sae import SAESpec, fast, fast_sharded, init_sae, sae_loss

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")

D_IN, D_SAE, B = 12, 48, 32


def _sae(k, *, ties=False, dtype="float32", seed=0):
    spec = SAESpec("topk", D_IN, D_SAE, k=k, aux_k=6, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D_IN)).astype(np.float32)
    sae = init_sae(jax.random.key(seed), spec, x)
    p = dict(sae.params)
    p["b_enc"] = p["b_enc"] + 0.2 * jnp.asarray(rng.normal(size=(D_SAE,)), jnp.float32)
    if ties:  # latents j and j + 24 are identical: every pre-activation appears twice
        half = D_SAE // 2
        p["W_enc"] = jnp.concatenate([p["W_enc"][:, :half]] * 2, axis=1)
        p["b_enc"] = jnp.concatenate([p["b_enc"][:half]] * 2)
    return sae.replace(params=p), x


def _loss_and_grads(sae, x, dead, mesh=None):
    topk_fn = None if mesh is None else parallel.sharded_topk_fn(mesh)

    def f(params):
        s = sae.replace(params=params)
        return sae_loss(s, jnp.asarray(x) * s.norm_scale, sparsity_coef=0.0, dead_mask=dead,
                        aux_coef=0.5, topk_fn=topk_fn, mesh=mesh)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(sae.params)


def _fast(sae):
    return sae.replace(spec=dataclasses.replace(sae.spec, fast_path=True))


# k, ties, dead latents (AuxK on), encoder row block (rows per device per block)
CASES = [
    (4, False, False, 1024),
    (4, True, True, 1024),  # exact ties across shards: both keep the lower latent index
    (4, False, True, 4),  # selection in several row blocks per device
    (20, False, True, 1024),  # k larger than a shard's latents at model=4, 8 (12 and 6)
    (D_SAE, False, True, 8),  # k == d_sae
]


@pytest.mark.parametrize("k,ties,dead,block", CASES)
@pytest.mark.parametrize("data,model", [(4, 2), (2, 4), (1, 8)])
def test_sharded_fast_loss_and_grads_equal_single_device(k, ties, dead, block, data, model,
                                                         monkeypatch):
    monkeypatch.setattr(fast, "ENCODE_BLOCK_ROWS", block)
    sae, x = _sae(k, ties=ties)
    dead_mask = (jnp.arange(D_SAE) % 3 == 0) if dead else jnp.zeros((D_SAE,), bool)
    (l_r, a_r), g_r = _loss_and_grads(sae, x, dead_mask)  # one device, dense reference
    mesh = parallel.make_mesh(data, model)
    assert fast_sharded.applies(_fast(sae), mesh) and not fast_sharded.applies(sae, mesh)
    (l_f, a_f), g_f = _loss_and_grads(_fast(sae), x, dead_mask, mesh)
    assert isinstance(a_f["z"], fast.SparseCodes)  # the sharded fast path ran
    assert float(a_r["auxk"] > 0) == float(dead)
    np.testing.assert_allclose(float(l_f), float(l_r), rtol=2e-5)
    np.testing.assert_allclose(float(a_f["auxk"]), float(a_r["auxk"]), rtol=2e-5, atol=1e-6)
    z_f = np.asarray(a_f["z"].dense())
    np.testing.assert_array_equal(z_f > 0, np.asarray(a_r["z"]) > 0)  # same latents selected
    np.testing.assert_allclose(z_f, np.asarray(a_r["z"]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(a_f["x_hat"]), np.asarray(a_r["x_hat"]), atol=2e-5)
    assert set(g_f) == set(g_r)
    for name, ref in g_r.items():
        scale = max(float(jnp.abs(ref).max()), 1.0)
        np.testing.assert_allclose(np.asarray(g_f[name]), np.asarray(ref), rtol=2e-5,
                                   atol=2e-5 * scale, err_msg=name)


def test_sharded_fast_with_chunked_top_k_equals_single_device():
    sae, x = _sae(4, ties=True)
    dead = jnp.arange(D_SAE) % 3 == 0
    (l_r, a_r), g_r = _loss_and_grads(sae, x, dead)
    chunked = sae.replace(spec=dataclasses.replace(sae.spec, fast_path=True, topk_chunk=6))
    (l_f, a_f), g_f = _loss_and_grads(chunked, x, dead, parallel.make_mesh(2, 2,
                                                                          jax.devices()[:4]))
    np.testing.assert_allclose(float(l_f), float(l_r), rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(a_f["z"].dense()) > 0, np.asarray(a_r["z"]) > 0)
    for name, ref in g_r.items():
        np.testing.assert_allclose(np.asarray(g_f[name]), np.asarray(ref), rtol=2e-5,
                                   atol=2e-5 * max(float(jnp.abs(ref).max()), 1.0), err_msg=name)


def test_sharded_fast_bfloat16_close_to_single_device():
    sae, x = _sae(4, dtype="bfloat16")
    dead = jnp.arange(D_SAE) % 4 == 0
    (l_r, _), g_r = _loss_and_grads(_fast(sae), x, dead)
    (l_f, _), g_f = _loss_and_grads(_fast(sae), x, dead, parallel.make_mesh(2, 4))
    np.testing.assert_allclose(float(l_f), float(l_r), rtol=1e-3)
    for name, ref in g_r.items():
        np.testing.assert_allclose(np.asarray(g_f[name]), np.asarray(ref), rtol=2e-2,
                                   atol=2e-2 * max(float(jnp.abs(ref).max()), 1.0), err_msg=name)


def test_only_topk_with_a_model_axis_takes_the_sharded_path():
    sae, _ = _sae(4)
    assert not fast_sharded.applies(_fast(sae), None)
    assert not fast_sharded.applies(_fast(sae), parallel.make_mesh(8, 1))
    batch = sae.replace(spec=dataclasses.replace(sae.spec, architecture="batchtopk",
                                                 fast_path=True))
    assert not fast_sharded.applies(batch, parallel.make_mesh(2, 4))


def test_sharded_fast_step_never_holds_a_dense_code_array(monkeypatch):
    """XLA's buffer assignment for the whole `jsae train` step on a (1, 4) mesh: the fast
    step's scratch stays far below one per-device [B, d_sae / 4] array; the reference's does
    not (so this test can tell them apart)."""
    monkeypatch.setattr(fast, "ENCODE_BLOCK_ROWS", 128)  # 8 row blocks of the batch
    raw = {
        "data": {"source": "synthetic", "d_in": 16, "n_features": 64},
        "sae": {"d_sae": 65536, "k": 8, "init_sample": 256},
        "train": {"steps": 10, "batch_size": 1024},
    }
    dense_bytes = 1024 * (65536 // 4) * 4  # one float32 [B, d_sae / model] array: 64 MiB
    temps = {}
    for on in (True, False):
        cfg = config.from_dict({**raw, "sae": {**raw["sae"], "fast_path": on}})
        temps[on] = plan(cfg, 1, 4).temp
    assert temps[False] > dense_bytes
    assert temps[True] < dense_bytes / 2

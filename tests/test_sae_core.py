"""Encode/decode/loss/gradients of every architecture against a NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sae_reference import np_forward, np_loss, np_params, spec_for

from jsae.sae import SAESpec, decode, encode, fold_norm, init_sae, sae_loss
from jsae.sae.init import geometric_median, norm_scale_for
from jsae.sae.jumprelu import heaviside_ste, jumprelu_ste

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]
D_IN, D_SAE, K = 8, 24, 3


def _sae(arch, seed=0, l1_variant="anthropic"):
    rng = np.random.default_rng(seed)
    sample = (rng.standard_normal((256, D_IN)) * 2 + 0.5).astype(np.float32)
    spec = spec_for(arch, D_IN, D_SAE, k=K, l1_variant=l1_variant, jumprelu_bandwidth=0.5)
    sae = init_sae(jax.random.key(seed), spec, sample, jumprelu_init_threshold=0.05)
    # perturb all params so biases/thresholds are non-trivial
    p = {n: v + 0.05 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    if arch == "batchtopk":
        p["threshold"] = jnp.full((D_SAE,), 0.2, jnp.float32)
    return sae.replace(params=p), sample


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_numpy(arch):
    sae, sample = _sae(arch)
    x = sample[:32]
    p = np_params(sae)
    s = float(sae.norm_scale)
    _, z_ref, xh_ref = np_forward(p, arch, x.astype(np.float64) * s, k=K, train=False)
    z = np.asarray(encode(sae, jnp.asarray(x)))
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(decode(sae, z)), xh_ref / s, rtol=1e-4, atol=1e-4)
    chex.assert_shape(z, (32, D_SAE))


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_matches_numpy(arch):
    sae, sample = _sae(arch)
    x_n = sample[:32] * float(sae.norm_scale)
    loss, aux = sae_loss(sae, jnp.asarray(x_n), sparsity_coef=0.7)
    ref = np_loss(np_params(sae), arch, x_n.astype(np.float64), coef=0.7, k=K)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)


def test_topk_exactly_k_nonzero():
    sae, sample = _sae("topk")
    z = np.asarray(encode(sae, jnp.asarray(sample)))
    assert np.all((z != 0).sum(-1) <= K)
    # pre-activations are shifted to be positive so exactly k survive the ReLU
    p = dict(sae.params)
    p["b_enc"] = p["b_enc"] + 100.0
    z = np.asarray(encode(sae.replace(params=p), jnp.asarray(sample)))
    assert np.all((z != 0).sum(-1) == K)


def test_batchtopk_keeps_k_times_batch():
    sae, sample = _sae("batchtopk")
    p = dict(sae.params)
    p["b_enc"] = p["b_enc"] + 100.0
    sae = sae.replace(params=p)
    _, aux = sae_loss(sae, jnp.asarray(sample[:16] * float(sae.norm_scale)), sparsity_coef=0.0)
    assert int((np.asarray(aux["z"]) > 0).sum()) == K * 16


def _fd_grad(f, p, name, idx, h=1e-4):
    plus = {k: v.copy() for k, v in p.items()}
    minus = {k: v.copy() for k, v in p.items()}
    plus[name][idx] += h
    minus[name][idx] -= h
    return (f(plus) - f(minus)) / (2 * h)


@pytest.mark.parametrize(
    "arch,variant",
    [("relu", "anthropic"), ("relu", "standard"), ("topk", "anthropic"), ("gated", "anthropic")],
)
def test_gradients_match_finite_differences(arch, variant):
    sae, sample = _sae(arch, l1_variant=variant)
    x_n = (sample[:32] * float(sae.norm_scale)).astype(np.float64)
    grads = jax.grad(
        lambda prm: sae_loss(sae.replace(params=prm), jnp.asarray(x_n, jnp.float32),
                             sparsity_coef=0.7)[0]
    )(sae.params)
    p0 = np_params(sae)
    frozen = {k: v.copy() for k, v in p0.items()}
    f = lambda p: np_loss(p, arch, x_n, coef=0.7, k=K, l1_variant=variant, frozen=frozen)
    rng = np.random.default_rng(1)
    for name in p0:
        for _ in range(4):
            idx = tuple(rng.integers(0, s) for s in p0[name].shape)
            ref = _fd_grad(f, p0, name, idx)
            got = float(np.asarray(grads[name])[idx])
            assert got == pytest.approx(ref, rel=2e-2, abs=2e-3), (name, idx)


def test_jumprelu_threshold_gradient_is_ste_formula():
    rng = np.random.default_rng(0)
    pre = rng.uniform(0.0, 1.0, (64, 5)).astype(np.float32)
    t = np.array([0.2, 0.4, 0.5, 0.6, 0.8], np.float32)
    eps = 0.1
    g_out = rng.standard_normal((64, 5)).astype(np.float32)
    _, vjp = jax.vjp(lambda a, b: jumprelu_ste(a, b, eps), jnp.asarray(pre), jnp.asarray(t))
    g_pre, g_t = vjp(jnp.asarray(g_out))
    rect = (np.abs((pre - t) / eps) < 0.5).astype(np.float32)
    np.testing.assert_allclose(np.asarray(g_t), (-(t / eps) * rect * g_out).sum(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_pre), g_out * (pre > t), rtol=1e-6)
    _, vjp = jax.vjp(lambda a, b: heaviside_ste(a, b, eps), jnp.asarray(pre), jnp.asarray(t))
    g_pre, g_t = vjp(jnp.asarray(g_out))
    np.testing.assert_allclose(np.asarray(g_t), (-(1 / eps) * rect * g_out).sum(0), rtol=1e-5)
    assert np.all(np.asarray(g_pre) == 0)


def test_jumprelu_loss_gradient_on_log_threshold():
    sae, sample = _sae("jumprelu")
    x_n = jnp.asarray(sample[:64] * float(sae.norm_scale))
    g = jax.grad(lambda prm: sae_loss(sae.replace(params=prm), x_n, sparsity_coef=0.7)[0])(
        sae.params)["log_threshold"]
    p = np_params(sae)
    pre = (np.asarray(x_n, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    t = np.exp(p["log_threshold"])
    eps = sae.spec.options.jumprelu_bandwidth
    rect = (np.abs((pre - t) / eps) < 0.5)
    x_hat = np.where(pre > t, pre, 0) @ p["W_dec"] + p["b_dec"]
    dz = (2 * (x_hat - np.asarray(x_n, np.float64)) @ p["W_dec"].T) / pre.shape[0]
    g_t = ((-(t / eps) * rect) * dz).sum(0) + 0.7 * (-(1 / eps) * rect).sum(0) / pre.shape[0]
    np.testing.assert_allclose(np.asarray(g), g_t * t, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_norm_preserves_outputs(arch):
    sae, sample = _sae(arch)
    folded = fold_norm(sae)
    assert float(folded.norm_scale) == 1.0
    x = jnp.asarray(sample[:16])
    np.testing.assert_allclose(encode(folded, x), encode(sae, x), rtol=1e-4, atol=1e-5)
    z = encode(sae, x)
    np.testing.assert_allclose(decode(folded, z), decode(sae, z), rtol=1e-4, atol=1e-5)


def test_init_normalisation_and_tied_weights():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)) * 7.0 + 3.0
    s = norm_scale_for(x)
    assert np.mean(np.sum((x * s) ** 2, -1)) == pytest.approx(16.0, rel=1e-6)
    sae = init_sae(jax.random.key(0), SAESpec("topk", 16, 64, k=4), x)
    np.testing.assert_array_equal(sae.params["W_enc"], sae.params["W_dec"].T)
    np.testing.assert_allclose(np.linalg.norm(sae.params["W_dec"], axis=-1), 1.0, rtol=1e-5)
    anth = init_sae(jax.random.key(0), SAESpec("relu", 16, 64), x)
    np.testing.assert_allclose(np.linalg.norm(anth.params["W_dec"], axis=-1), 0.1, rtol=1e-5)


def test_geometric_median_is_weiszfeld_not_mean():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((95, 3)), 1000 + rng.standard_normal((5, 3))])
    gm = geometric_median(x)
    dist = lambda y: np.linalg.norm(x - y, axis=-1).sum()
    assert np.linalg.norm(gm) < 1.0  # robust to the outliers; the mean is ~50 away
    assert np.linalg.norm(x.mean(0)) > 40
    for _ in range(20):  # no nearby point has a smaller sum of distances
        assert dist(gm) <= dist(gm + 0.01 * rng.standard_normal(3)) + 1e-9
    sae = init_sae(jax.random.key(0), SAESpec("topk", 3, 8, k=2), x, normalize=False)
    np.testing.assert_allclose(sae.params["b_dec"], gm, rtol=1e-5)

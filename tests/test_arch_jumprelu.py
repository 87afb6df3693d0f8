"""JumpReLU sparsity terms (step, tanh, quadratic) against NumPy, and the threshold
parameterisation: a linear threshold reaches a target L0, a log one barely moves (SAELens #718)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae import parallel
from jsae.config import from_dict
from jsae.data.sources import SyntheticSource
from jsae.sae import SAESpec, encode, init_sae, sae_loss
from jsae.train import Trainer

D_IN, D_SAE = 6, 12


def _sae(mode, threshold="log", target_l0=None):
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((64, D_IN)).astype(np.float32)
    spec = SAESpec("jumprelu", D_IN, D_SAE, jumprelu_bandwidth=0.5, jumprelu_sparsity=mode,
                   target_l0=target_l0, jumprelu_threshold=threshold)
    sae = init_sae(jax.random.key(0), spec, sample, jumprelu_init_threshold=0.3)
    p = {n: v + 0.1 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    if "threshold" in p:
        p["threshold"] = jnp.abs(p["threshold"])
    return sae.replace(params=p), sample * float(sae.norm_scale)


def _np_parts(sae, x):
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    thr = np.exp(p["log_threshold"]) if "log_threshold" in p else p["threshold"]
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    z = np.where(pre > thr, pre, 0.0)
    recon = np.sum((z @ p["W_dec"] + p["b_dec"] - x) ** 2, -1).mean()
    return p, pre, z, thr, recon


@pytest.mark.parametrize("mode", ["step", "tanh", "quadratic"])
def test_sparsity_terms_match_numpy(mode):
    sae, x = _sae(mode, target_l0=3.0)
    loss, aux = sae_loss(sae, jnp.asarray(x), sparsity_coef=0.7)
    p, pre, z, thr, recon = _np_parts(sae, x.astype(np.float64))
    l0_tok = np.sum(pre > thr, -1)
    l0 = l0_tok.mean()
    norms = np.linalg.norm(p["W_dec"], axis=-1)
    want = {"step": 0.7 * l0,
            "tanh": 0.7 * np.sum(np.tanh(4.0 * np.abs(z) * norms), -1).mean(),
            "quadratic": 0.7 * np.mean(2 / 3.0 * (l0_tok - 3.0) ** 2)}[mode]  # SAELens 6
    assert float(aux["recon"]) == pytest.approx(recon, rel=1e-5)
    assert float(aux["sparsity"]) == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(recon + want, rel=1e-5)


def test_tanh_gradient_on_decoder_matches_finite_differences():
    sae, x = _sae("tanh")
    g = jax.grad(lambda w: sae_loss(sae.replace(params={**sae.params, "W_dec": w}),
                                    jnp.asarray(x), sparsity_coef=0.7)[0])(sae.params["W_dec"])
    p, pre, z, thr, _ = _np_parts(sae, x.astype(np.float64))

    def f(w):
        recon = np.sum((z @ w + p["b_dec"] - x) ** 2, -1).mean()
        return recon + 0.7 * np.sum(np.tanh(4.0 * np.abs(z) * np.linalg.norm(w, axis=-1)), -1).mean()

    rng = np.random.default_rng(1)
    for _ in range(6):
        i, j = rng.integers(0, D_SAE), rng.integers(0, D_IN)
        e = np.zeros_like(p["W_dec"])
        e[i, j] = 1e-5
        ref = (f(p["W_dec"] + e) - f(p["W_dec"] - e)) / 2e-5
        assert float(g[i, j]) == pytest.approx(ref, rel=2e-3, abs=2e-5)


def test_linear_and_log_thresholds_give_the_same_sae():
    log_sae, x = _sae("step")
    lin = log_sae.replace(
        params={**{k: v for k, v in log_sae.params.items() if k != "log_threshold"},
                "threshold": jnp.exp(log_sae.params["log_threshold"])},
        spec=SAESpec("jumprelu", D_IN, D_SAE, jumprelu_bandwidth=0.5, jumprelu_threshold="linear"))
    np.testing.assert_array_equal(np.asarray(encode(lin, x)), np.asarray(encode(log_sae, x)))
    # the gradient w.r.t. the threshold is the chain rule of the log one
    gl = jax.grad(lambda p: sae_loss(log_sae.replace(params=p), jnp.asarray(x),
                                     sparsity_coef=0.7)[0])(log_sae.params)["log_threshold"]
    gt = jax.grad(lambda p: sae_loss(lin.replace(params=p), jnp.asarray(x),
                                     sparsity_coef=0.7)[0])(lin.params)["threshold"]
    np.testing.assert_allclose(np.asarray(gl), np.asarray(gt * lin.params["threshold"]),
                               rtol=1e-5, atol=1e-7)


STEPS, TARGET = 200, 4.0


def _train_l0(threshold: str) -> float:
    cfg = from_dict({
        "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 3},
        "sae": {"architecture": "jumprelu", "d_sae": 64, "jumprelu_sparsity": "quadratic",
                "target_l0": TARGET, "l0_coef": 2.5, "jumprelu_bandwidth": 0.05,
                "jumprelu_init_threshold": 0.01, "jumprelu_threshold": threshold},
        "train": {"steps": STEPS, "batch_size": 256, "lr": 1e-2, "lr_warmup_steps": 0,
                  "lr_decay": "constant", "log_every": 1000, "progress": False},
        "checkpoint": {"enabled": False},
    })
    tr = Trainer(cfg, SyntheticSource(16, 64, 3, seed=3),
                 mesh=parallel.make_mesh(1, 1, jax.devices()[:1]))
    states = tr.init_states()
    l0s = []
    for _ in range(STEPS):
        states, m = tr.step(states, tr.source.next_batch(256))
        l0s.append(float(m["synthetic"]["l0"]))
    return float(np.mean(l0s[-20:]))  # the L0 of the last 20 batches


def test_quadratic_penalty_reaches_target_l0_with_a_linear_threshold():
    """Synthetic data (3 active features of 64 per token), init threshold 0.01 (initial L0 ~32
    of 64 latents), Adam lr 1e-2: a linear threshold brings L0 to the target 4 within 200
    steps; the log threshold (Gemma Scope's parameterisation) is still above 16 (#718)."""
    assert _train_l0("linear") == pytest.approx(TARGET, rel=0.25)
    assert _train_l0("log") > 4 * TARGET

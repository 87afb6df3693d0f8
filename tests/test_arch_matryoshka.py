"""Matryoshka BatchTopK: nested-prefix losses on a hand-computed example and against NumPy,
gradients against finite differences, the fast path and 8 simulated devices against the
reference path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mesh_check import assert_meshes_match

from jsae import parallel
from jsae.config import from_dict
from jsae.data.sources import SyntheticSource
from jsae.sae import SAE, SAESpec, init_sae, sae_loss
from jsae.train import Trainer

GROUPS, WEIGHTS, K = (4, 8, 16), (0.5, 1.0, 2.0), 3


def test_prefix_losses_by_hand():
    # pre row 0 = [2, 0, 1], row 1 = [0, 1.5, 0.75]; BatchTopK (k=1, B=2) keeps 2 and 1.5,
    # so z = [[2, 0, 0], [0, 1.5, 0]]. Prefix 1 decodes row 0 to [2, 0] (error 0) and row 1 to
    # [0, 0] (error 1.5^2); the full dictionary decodes row 1 to [0, 0.75] (error 0.75^2).
    params = {"W_enc": jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]), "b_enc": jnp.zeros(3),
              "W_dec": jnp.array([[1.0, 0.0], [0.0, 0.5], [1.0, 1.0]]), "b_dec": jnp.zeros(2),
              "threshold": jnp.full(3, -1.0)}
    spec = SAESpec("matryoshka", 2, 3, k=1, matryoshka_groups=(1, 3), matryoshka_weights=(0.5, 2.0))
    sae = SAE(params=params, norm_scale=jnp.ones(()), spec=spec)
    x = jnp.array([[2.0, 0.0], [0.0, 1.5]])
    loss, aux = sae_loss(sae, x, sparsity_coef=0.0)
    assert float(aux["matryoshka"]) == pytest.approx(0.5 * 2.25 / 2)
    assert float(aux["recon"]) == pytest.approx(2.0 * 0.5625 / 2)
    assert float(loss) == pytest.approx(0.5625 + 0.5625)


def _sae(fast=False, seed=0):
    rng = np.random.default_rng(seed)
    sample = (rng.standard_normal((64, 8)) + 0.3).astype(np.float32)
    spec = SAESpec("matryoshka", 8, 16, k=K, matryoshka_groups=GROUPS,
                   matryoshka_weights=WEIGHTS, fast_path=fast)
    sae = init_sae(jax.random.key(seed), spec, sample)
    p = {n: v + 0.05 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    return sae.replace(params=p), sample * float(sae.norm_scale)


def _np_loss(p, x):
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.maximum(pre, 0.0).reshape(-1)
    keep = np.argsort(-acts, kind="stable")[: K * x.shape[0]]
    z = np.zeros_like(acts)
    z[keep] = acts[keep]
    z = z.reshape(pre.shape)
    total = 0.0
    for n, w in zip(GROUPS, WEIGHTS):
        x_hat = z[:, :n] @ p["W_dec"][:n] + p["b_dec"]
        total += w * np.sum((x_hat - x) ** 2, -1).mean()
    return total


def test_loss_matches_numpy_and_fast_path():
    sae, x = _sae()
    loss, aux = sae_loss(sae, jnp.asarray(x), sparsity_coef=0.0)
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    assert float(aux["recon"] + aux["matryoshka"]) == pytest.approx(_np_loss(p, x), rel=1e-5)
    fast, _ = _sae(fast=True)
    f = lambda s: jax.value_and_grad(lambda q: sae_loss(s.replace(params=q), jnp.asarray(x),
                                                        sparsity_coef=0.0)[0])(s.params)
    (lr, gr), (lf, gf) = f(sae), f(fast)
    assert float(lf) == pytest.approx(float(lr), rel=1e-6)
    for name in gr:
        np.testing.assert_allclose(np.asarray(gf[name]), np.asarray(gr[name]), rtol=1e-4,
                                   atol=1e-6, err_msg=name)


def test_gradients_match_finite_differences():
    sae, x = _sae()
    g = jax.grad(lambda q: sae_loss(sae.replace(params=q), jnp.asarray(x),
                                    sparsity_coef=0.0)[0])(sae.params)
    p0 = {k: np.asarray(v, np.float64) for k, v in sae.params.items() if k != "threshold"}
    rng = np.random.default_rng(2)
    for name in p0:
        for _ in range(4):
            idx = tuple(rng.integers(0, s) for s in p0[name].shape)
            up, dn = ({k: v.copy() for k, v in p0.items()} for _ in range(2))
            up[name][idx] += 1e-5
            dn[name][idx] -= 1e-5
            ref = (_np_loss(up, x) - _np_loss(dn, x)) / 2e-5
            assert float(np.asarray(g[name])[idx]) == pytest.approx(ref, rel=2e-3, abs=2e-4), (name, idx)


def test_bad_groups_are_a_clear_error():
    with pytest.raises(ValueError, match="matryoshka_groups"):
        sae_loss(_sae()[0].replace(spec=SAESpec("matryoshka", 8, 16, k=K, matryoshka_groups=(8, 4))),
                 jnp.zeros((4, 8)), sparsity_coef=0.0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
def test_meshes_match_single_device():
    def train(data, model):
        cfg = from_dict({  # seed 1: no latent within float error of the batch threshold
            "seed": 1,           # (see tests/test_parallel.py::_cfg)
            "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 3},
            "sae": {"architecture": "matryoshka", "d_sae": 128, "k": 4, "dead_after_tokens": 2048,
                    "matryoshka_groups": [16, 64]},
            "train": {"steps": 4, "batch_size": 128, "lr": 1e-2, "lr_warmup_steps": 0,
                      "log_every": 2, "progress": False},
            "checkpoint": {"enabled": False},
        })
        tr = Trainer(cfg, SyntheticSource(16, 64, 3, seed=3), mesh=parallel.make_mesh(data, model))
        states = tr.init_states()
        for _ in range(cfg.train.steps):
            states, m = tr.step(states, tr.source.next_batch(cfg.train.batch_size))
        return jax.device_get(states["synthetic"]), jax.device_get(m["synthetic"])

    assert_meshes_match(train, metric="matryoshka")


def test_preflight_checks_k_against_the_resolved_d_sae():
    # d_sae from sae.expansion is only known at preflight: the registry's needs_k drives the check
    from pathlib import Path

    from jsae import config as config_lib
    from jsae.config import ConfigError
    from jsae.train.preflight import preflight

    root = Path(__file__).resolve().parents[1]
    cfg = config_lib.load(root / "configs" / "synthetic.yaml", [
        "sae.architecture=matryoshka", "sae.d_sae=null", "sae.expansion=1", "sae.k=100",
        "sae.matryoshka_groups=[16]"])
    with pytest.raises(ConfigError, match="'sae.k': k=100 exceeds d_sae=64"):
        preflight(cfg)

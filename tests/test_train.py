"""Training step, schedules and ground-truth recovery on synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sae_reference import sae_section, spec_for

from jsae.config import from_dict
from jsae.data.sources import SyntheticSource
from jsae.evals.reconstruction import dictionary_recovery, reconstruction_metrics
from jsae.sae import SAESpec, init_sae
from jsae.train import Run, Trainer, init_state, lr_schedule, make_optimizer, make_train_step
from jsae.train.step import _remove_parallel_grad


def _cfg(**over):
    raw = {
        "data": {"source": "synthetic", "d_in": 32, "n_features": 128, "active_per_sample": 3},
        "sae": {"architecture": "topk", "d_sae": 256, "k": 3, "dead_after_tokens": 50_000},
        "train": {"steps": 40, "batch_size": 256, "lr": 3e-3, "lr_warmup_steps": 5,
                  "log_every": 10, "progress": False},
        "eval": {"tokens": 2048},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    raw["sae"] = sae_section(raw["sae"])
    return from_dict(raw)


def test_remove_parallel_grad_is_orthogonal_to_rows():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 6)).astype(np.float32)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    g = rng.standard_normal((10, 6)).astype(np.float32)
    out = np.asarray(_remove_parallel_grad(jnp.asarray(g), jnp.asarray(w)))
    np.testing.assert_allclose((out * w).sum(-1), 0.0, atol=1e-6)
    ref = g - (g * w).sum(-1, keepdims=True) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_hold_decay():
    cfg = _cfg(train__steps=100, train__lr_warmup_steps=10, train__lr_decay_start=0.8)
    sched = lr_schedule(cfg, 100)
    lr = cfg.train.lr
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(5)) == pytest.approx(lr / 2, rel=1e-5)
    assert float(sched(50)) == pytest.approx(lr)
    assert float(sched(90)) == pytest.approx(lr / 2, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_train_step_reduces_loss_and_keeps_constraints(arch):
    cfg = _cfg(sae__architecture=arch, sae__l1_coef=0.5, sae__l0_coef=0.05)
    src = SyntheticSource(32, 128, 3, seed=0)
    spec = spec_for(arch, 32, 256, k=3, jumprelu_bandwidth=0.05)
    sae = init_sae(jax.random.key(0), spec, src.next_batch(1024)["synthetic"])
    opt = make_optimizer(cfg, 60)
    step = jax.jit(make_train_step(opt, optax.constant_schedule(0.5), lr_schedule(cfg, 60),
                                   dead_after_tokens=10**9))
    state = init_state(sae, opt, jax.random.key(1))
    losses = []
    for _ in range(60):
        state, m = step(state, jnp.asarray(src.next_batch(256)["synthetic"]))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert int(state.step) == 60
    norms = np.linalg.norm(np.asarray(state.sae.params["W_dec"]), axis=-1)
    if spec.unit_decoder:
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    if arch == "batchtopk":
        thr = np.asarray(state.sae.params["threshold"])
        assert np.all(thr > 0) and np.ptp(thr) == 0


def test_fired_ago_counts_tokens_and_resets():
    cfg = _cfg()
    spec = SAESpec("topk", 32, 256, k=3)
    src = SyntheticSource(32, 128, 3)
    sae = init_sae(jax.random.key(0), spec, src.next_batch(512)["synthetic"])
    opt = make_optimizer(cfg, 10)
    step = make_train_step(opt, optax.constant_schedule(0.0), lr_schedule(cfg, 10),
                           dead_after_tokens=300)
    state = init_state(sae, opt, jax.random.key(0))
    x = jnp.asarray(src.next_batch(128)["synthetic"])
    state, m = step(state, x)
    z = np.asarray(jax.jit(lambda s, x: __import__("jsae").sae.encode(s, x))(sae, x))
    fired = (z > 0).any(0)
    ago = np.asarray(state.fired_ago)
    assert np.all(ago[fired] == 0) and np.all(ago[~fired] == 128)
    state, _ = step(state, x)
    state, m = step(state, x)
    ago2 = np.asarray(state.fired_ago)
    assert float(m["dead_frac"]) == pytest.approx(np.mean(ago2 >= 300))


def test_auxk_revives_dead_latents():
    """With AuxK, latents marked dead receive gradient; without it they don't."""
    spec = SAESpec("topk", 32, 256, k=3, aux_k=16)
    src = SyntheticSource(32, 128, 3)
    sae = init_sae(jax.random.key(0), spec, src.next_batch(512)["synthetic"])
    from jsae.sae import sae_loss

    x_n = jnp.asarray(src.next_batch(256)["synthetic"]) * sae.norm_scale
    dead = jnp.zeros(256, bool).at[128:].set(True)
    g = jax.grad(lambda p: sae_loss(sae.replace(params=p), x_n, sparsity_coef=0.0,
                                    dead_mask=dead, aux_coef=1.0)[0])(sae.params)
    g0 = jax.grad(lambda p: sae_loss(sae.replace(params=p), x_n, sparsity_coef=0.0,
                                     dead_mask=dead, aux_coef=0.0)[0])(sae.params)
    diff = np.abs(np.asarray(g["W_dec"]) - np.asarray(g0["W_dec"])).sum(-1)
    assert diff[128:].sum() > 0 and diff[:128].sum() == 0


def test_topk_recovers_ground_truth_dictionary(tmp_path):
    """512 true features in d=64, 4 active per sample: best-cosine recovery >= 0.9."""
    cfg = from_dict({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic", "d_in": 64, "n_features": 512, "active_per_sample": 4},
        "sae": {"architecture": "topk", "d_sae": 1024, "k": 4, "dead_after_tokens": 200_000},
        "train": {"steps": 600, "batch_size": 1024, "lr": 4e-3, "lr_warmup_steps": 30,
                  "log_every": 100, "progress": False},
        "eval": {"tokens": 8192},
        "checkpoint": {"enabled": False},
        "mesh": {"data": 1, "model": 1},
    })
    src = SyntheticSource(64, 512, 4, seed=0)
    trainer = Trainer(cfg, src)
    summary = Run(cfg, log=lambda s: None).train(trainer)
    sae = jax.device_get(trainer.states["synthetic"].sae)
    rec = dictionary_recovery(sae, src.features)
    assert rec >= 0.9, rec
    held = summary["heldout"]["synthetic"]
    assert held["fvu"] < 0.2 and held["l0"] <= 4.0
    ref = reconstruction_metrics(sae, (b["synthetic"] for b in src.eval_batches(8192, 1024)))
    assert ref["fvu"] == pytest.approx(held["fvu"], rel=1e-5)
    # run directory artefacts
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.csv", "summary.json", "plots/training.png",
              "saes/synthetic/sae.safetensors"):
        assert (run / f).exists(), f


def test_metrics_logger_adds_columns_for_new_metrics(tmp_path):
    from jsae.train.metrics_log import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(10, {"loss": 1.0, "fvu": 0.5})
    log.log(20, {"loss": 0.8, "fvu": 0.4, "eval_fvu": 0.45})
    log.log(30, {"loss": 0.7, "fvu": 0.3})
    cols = read_metrics(tmp_path / "metrics.csv")
    assert cols["step"] == [10, 20, 30]
    assert cols["loss"] == [1.0, 0.8, 0.7]
    assert np.isnan(cols["eval_fvu"][0]) and cols["eval_fvu"][1] == 0.45


def test_batchtopk_threshold_follows_recent_batches():
    """The inference threshold: an EMA of the batches' smallest positive codes whose horizon is
    a tenth of the updates so far, then SAELens's (rate 0.01 from update 990); neither a large
    first batch nor a run's early, larger codes set it."""
    from jsae.sae.archs.batchtopk import ema_threshold

    rng = np.random.default_rng(0)
    minima = np.concatenate([[10.0], rng.uniform(0.9, 1.1, 299)])
    thr, ref = jnp.full((4,), -1.0), None
    for step, m in enumerate(minima):
        z = jnp.asarray([[0.0, m, m + 1.0, 0.0], [m + 2.0, 0.0, 0.0, 0.0]], jnp.float32)
        thr = ema_threshold(thr, z, jnp.int32(step))
        rate = max(0.01, 1.0 / (1.0 + step / 10))
        ref = m if ref is None else (1 - rate) * ref + rate * m
        np.testing.assert_allclose(np.asarray(thr), ref, rtol=1e-5)
    assert abs(ref - 1.0) < 0.05  # the seed's weight is gone (a plain 0.99 EMA: 10 * 0.99^299)

    # codes shrinking through a short run (minima 2 -> 1 over 150 updates): the threshold ends
    # near the last batches' minima, where a running mean of all of them would sit at 1.5
    thr = jnp.full((4,), -1.0)
    for step, m in enumerate(np.linspace(2.0, 1.0, 150)):
        z = jnp.asarray([[m, 0.0, 0.0, 0.0]], jnp.float32)
        thr = ema_threshold(thr, z, jnp.int32(step))
    assert float(thr[0]) < 1.12

"""Steering transforms against float64 NumPy references (clamp with the error term, ablation,
scaling, addition, composition, position masks) and through the model's forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sae_reference import np_forward, np_params
from test_steering_helpers import TinyModel, random_sae

from jsae import steering
from jsae.models.transformer import forward
from jsae.sae import encode

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]
D, F = 16, 48


def _x(seed=0, shape=(2, 5, D)):
    return np.random.default_rng(seed).normal(0, 2.0, shape).astype(np.float32)


def _np_codes(sae, x):
    """Codes and reconstruction in float64 NumPy (raw units), x [..., D]."""
    p = np_params(sae)
    s = float(sae.norm_scale)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) * s
    _, z, _ = np_forward(p, sae.spec.architecture, flat, k=getattr(sae.spec.options, "k", None), train=False)
    return z.reshape(*x.shape[:-1], -1), p, s


def _np_decode(p, s, z):
    return (z @ p["W_dec"] + p["b_dec"]) / s


def _sample_sae(arch, seed=0):
    return random_sae(arch, D, F, seed=seed, sample=_x(seed + 100, (256, D)))


def _live_features(sae, x, n=2):
    z, _, _ = _np_codes(sae, x)
    order = np.argsort(-(z > 0).sum(axis=tuple(range(z.ndim - 1))))
    return [int(i) for i in order[:n]]


@pytest.mark.parametrize("arch", ARCHS)
def test_clamp_matches_error_term_formula(arch):
    """clamp: x - decode(encode(x)) + decode(z with z_f := v), several features at once."""
    sae = _sample_sae(arch)
    x = _x(1)
    feats, vals = [3, 17, 40], [5.0, 0.0, 1.5]
    out = np.asarray(jax.jit(steering.clamp(sae, feats, vals))(jnp.asarray(x)))
    z, p, s = _np_codes(sae, x)
    z2 = z.copy()
    z2[..., feats] = vals
    ref = x - _np_decode(p, s, z) + _np_decode(p, s, z2)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    # without the error term: the edited reconstruction itself
    out2 = np.asarray(steering.clamp(sae, feats, vals, keep_error=False)(jnp.asarray(x)))
    np.testing.assert_allclose(out2, _np_decode(p, s, z2), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_clamp_to_own_value_is_identity(arch):
    """Clamping a feature to the value it already has leaves the activation unchanged, even
    though the SAE reconstruction is far from exact."""
    sae = _sample_sae(arch)
    x = _x(2, (6, D))
    z, p, s = _np_codes(sae, x)
    assert np.abs(_np_decode(p, s, z) - x).max() > 0.1  # the error term is not small
    for f in _live_features(sae, x, 3):
        for t in range(x.shape[0]):
            xt = jnp.asarray(x[t : t + 1])
            out = steering.clamp(sae, f, float(z[t, f]))(xt)
            np.testing.assert_allclose(np.asarray(out), x[t : t + 1], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_ablate_removes_exactly_the_feature_contribution(arch):
    sae = _sample_sae(arch)
    x = _x(3)
    feats = _live_features(sae, x, 2)
    z, p, s = _np_codes(sae, x)
    assert (z[..., feats] > 0).any()
    out = np.asarray(steering.ablate(sae, feats)(jnp.asarray(x)))
    contribution = z[..., feats] @ p["W_dec"][feats] / s
    np.testing.assert_allclose(out, x - contribution, atol=2e-4, rtol=1e-4)
    # nothing but that contribution changed: adding it back restores x
    np.testing.assert_allclose(out + contribution, x, atol=2e-4)
    # scale(2) adds it once more; scale(1) is the identity
    np.testing.assert_allclose(np.asarray(steering.scale(sae, feats, 2.0)(jnp.asarray(x))),
                               x + contribution, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(steering.scale(sae, feats, 1.0)(jnp.asarray(x))), x, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_codes_equal_full_encode(arch):
    sae = _sample_sae(arch)
    x = jnp.asarray(_x(4))
    feats = jnp.asarray([0, 5, 47, 21])
    np.testing.assert_allclose(np.asarray(steering.feature_codes(sae, x, feats)),
                               np.asarray(encode(sae, x))[..., [0, 5, 47, 21]], atol=1e-5)


def test_add_compose_and_positions():
    sae = _sample_sae("relu")
    x = _x(5)
    d = steering.feature_direction(sae, 7)
    np.testing.assert_allclose(np.asarray(d), np.asarray(sae.params["W_dec"][7]) / float(sae.norm_scale), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.linalg.norm(steering.feature_direction(sae, 7, unit=True))), 1.0, rtol=1e-5)
    out = np.asarray(steering.add(d, 3.0)(jnp.asarray(x)))
    np.testing.assert_allclose(out, x + 3.0 * np.asarray(d), rtol=1e-5, atol=1e-5)
    # compose applies in order: ablate then add == x - contribution + 3 d
    fn = steering.compose(steering.ablate(sae, 7), steering.add(d, 3.0))
    z, p, s = _np_codes(sae, x)
    ref = x - z[..., [7]] @ p["W_dec"][[7]] / s + 3.0 * np.asarray(d)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(jnp.asarray(x))), ref, atol=2e-4)
    # positions: only where the mask is set
    mask = np.zeros(x.shape[:2], bool)
    mask[0, 2:] = True
    out = np.asarray(steering.at_positions(steering.add(d, 3.0), mask)(jnp.asarray(x)))
    np.testing.assert_allclose(out[mask], x[mask] + 3.0 * np.asarray(d), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[~mask], x[~mask])


def test_bad_arguments():
    sae = _sample_sae("relu")
    with pytest.raises(ValueError, match="out of range"):
        steering.clamp(sae, F, 1.0)
    with pytest.raises(ValueError, match="distinct"):
        steering.clamp(sae, [1, 1], 1.0)
    with pytest.raises(ValueError, match="list of 2"):
        steering.clamp(sae, [1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="vector"):
        steering.add(np.zeros((2, D)), 1.0)


def test_transforms_are_pytrees_new_values_do_not_recompile():
    sae = _sample_sae("topk")
    x = jnp.asarray(_x(6))
    traces = []

    @jax.jit
    def apply(fn, x):
        traces.append(1)
        return fn(x)

    a = apply(steering.clamp(sae, [1, 2], [3.0, 4.0]), x)
    b = apply(steering.clamp(sae, [5, 9], [1.0, -2.0]), x)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(b), np.asarray(steering.clamp(sae, [5, 9], [1.0, -2.0])(x)), atol=1e-5)


def test_clamp_inside_model_forward_equals_manual_splice():
    """A clamp handed to the forward as an intervention gives the same logits as running the
    blocks after the hook on the manually edited activation (computed from captured values)."""
    model = TinyModel()
    hook = "blocks.1.hook_resid_post"
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 9)), jnp.int32)
    acts = forward(model.cfg, model.params, tokens, capture=(hook,)).activations[hook]
    sae = random_sae("relu", model.cfg.d_model, 64, sample=np.asarray(acts).reshape(-1, model.cfg.d_model))
    fn = steering.clamp(sae, [3, 10], [8.0, 2.0])
    edited = np.asarray(fn(acts))
    out = forward(model.cfg, model.params, tokens, interventions={hook: fn}, capture=(hook,))
    np.testing.assert_allclose(np.asarray(out.activations[hook]), edited, atol=1e-5)
    # replacing the activation by the precomputed edited one gives the same logits
    ref = forward(model.cfg, model.params, tokens, interventions={hook: steering.add(jnp.zeros(model.cfg.d_model), 0.0)})
    assert not np.allclose(np.asarray(ref.logits), np.asarray(out.logits), atol=1e-3)  # steering did something
    same = forward(model.cfg, model.params, tokens,
                   interventions={hook: jax.tree_util.Partial(lambda e, x: e, jnp.asarray(edited))})
    np.testing.assert_allclose(np.asarray(same.logits), np.asarray(out.logits), atol=1e-4)


def _greedy_reference(model, prompt_ids, n_new, interventions, intervene_on):
    """Greedy decoding by re-running the whole sequence each step, one prompt at a time, no
    cache and no left padding; the transform is applied through a position mask. The sequence
    sits at the start of a fixed buffer (causal attention: what follows cannot matter), so one
    program serves every step."""
    L = max(len(p) for p in prompt_ids) + n_new
    out = []
    for ids in prompt_ids:
        seq, T0 = list(ids), len(ids)
        pos = np.arange(L)[None]
        where = {"all": pos >= 0, "prompt": pos < T0, "generated": pos >= T0}[intervene_on]
        fns = {h: steering.at_positions(f, where) for h, f in interventions.items()}
        for _ in range(n_new):
            buf = np.zeros((1, L), np.int32)
            buf[0, : len(seq)] = seq
            logits = forward(model.cfg, model.params, jnp.asarray(buf), interventions=fns).logits
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        out.append(seq[T0:])
    return np.asarray(out)


@pytest.mark.parametrize("intervene_on", ["all", "prompt", "generated"])
def test_steered_generation_with_cache_equals_without(intervene_on):
    from jsae.models.generate import generate_tokens

    model = TinyModel()
    hook = "blocks.1.hook_resid_post"
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 97, n)) for n in (5, 9, 3)]  # ragged: left padding in the batch
    acts = forward(model.cfg, model.params, jnp.asarray([prompts[1]]), capture=(hook,)).activations[hook]
    sae = random_sae("topk", model.cfg.d_model, 64, k=6, sample=np.asarray(acts)[0])
    fns = {hook: steering.compose(steering.clamp(sae, [3, 11], [6.0, 4.0]), steering.ablate(sae, 20))}
    n_new = 8
    cached = generate_tokens(model.cfg, model.params, prompts, n_new, interventions=fns,
                             intervene_on=intervene_on, eos_id=None)
    ref = _greedy_reference(model, prompts, n_new, fns, intervene_on)
    np.testing.assert_array_equal(cached, ref)
    base = generate_tokens(model.cfg, model.params, prompts, n_new, eos_id=None)
    if intervene_on != "prompt":
        assert (base != cached).any()  # the steering changes what is generated


def test_generate_pair_equals_separate_runs():
    """Greedy pairs run as one batch with the steering masked to the second half of the rows;
    the result equals two separate generations (and sampling pairs share the key)."""
    model = TinyModel()
    hook = "blocks.1.hook_resid_post"
    acts = forward(model.cfg, model.params, jnp.asarray([[5, 6, 7, 8, 9, 10]]), capture=(hook,)).activations[hook]
    sae = random_sae("relu", model.cfg.d_model, 32, sample=np.asarray(acts)[0])
    fns = {hook: steering.clamp(sae, [1, 4], [9.0, 3.0])}
    prompts = ["the bridge", "fog"]
    base, steered = steering.generate_pair(model, prompts, fns, 6)
    assert base == steering.generate(model, prompts, 6)
    assert steered == steering.generate(model, prompts, 6, interventions=fns)
    assert base != steered


def test_crosscoder_steers_by_adding_its_rows_at_every_hook(tmp_path, monkeypatch, capsys):
    """add_feature puts v * W_dec[f, l] / norm_scale at the l-th hook of a crosscoder (checked
    against a forward with the two additions written out), feature_direction needs the layer,
    and `jsae steer` on a crosscoder run refuses clamp in one line and generates with --mode
    add."""
    from jsae import cli
    from jsae.sae import SAESpec, init_sae
    from jsae.sae.io import save_sae

    model = TinyModel()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sae = init_sae(jax.random.key(0), SAESpec("crosscoder", model.cfg.d_model, 24, n_layers=2), None)
    sae = sae.replace(norm_scale=jnp.float32(2.0))
    fns = steering.add_feature(sae, hooks, [5, 7], [3.0, -1.5])
    assert set(fns) == set(hooks)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 7)), jnp.int32)
    W = np.asarray(sae.params["W_dec"])
    manual = {h: steering.add(jnp.asarray((3.0 * W[5, i] - 1.5 * W[7, i]) / 2.0), 1.0)
              for i, h in enumerate(hooks)}
    got = forward(model.cfg, model.params, tokens, interventions=fns).logits
    ref = forward(model.cfg, model.params, tokens, interventions=manual).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="layer="):
        steering.feature_direction(sae, 5)
    with pytest.raises(ValueError, match="2 hooks given|1 hooks given"):
        steering.add_feature(sae, hooks[:1], 5, 1.0)

    key = "+".join(hooks)
    run = tmp_path / "run"
    save_sae(sae, run / "saes" / key, {"hook": key, "hook_names": hooks})
    (run / "config.yaml").write_text(f"model:\n  name: tiny\n  hooks: [{', '.join(hooks)}]\n"
                                     "sae:\n  architecture: crosscoder\n")
    monkeypatch.setattr("jsae.models.load", lambda name, dtype="float32": model)
    rc = cli.main(["steer", str(run), "--feature", "5", "--value", "3", "--prompt", "ab",
                   "--tokens", "3"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("jsae steer:")]  # after its log line
    assert rc == 2 and len(errors) == 1 and "use --mode add" in errors[0], err
    rc = cli.main(["steer", str(run), "--feature", "5", "--value", "3", "--mode", "add",
                   "--prompt", "ab", "--tokens", "3"])
    assert rc == 0 and "+3 x dir(f5)" in capsys.readouterr().out

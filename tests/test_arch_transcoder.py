"""Transcoders (TopK, JumpReLU) and skip transcoders: loss against NumPy, gradients against
finite differences, recovery of a synthetic linear-plus-sparse map (x_target = x_in A + c D),
and export -> real sae-lens -> the same codes and outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from saelens_side import run_saelens, saelens_python

from jsae import parallel
from jsae.export.saelens import save_saelens
from jsae.sae import SAE, SAESpec, encode, fold_norm, init_sae, sae_loss
from jsae.sae.archs import get_arch
from jsae.sae.core import decode_normalized, encode_normalized

D, D_SAE, K, AUX_K = 8, 24, 3, 4
ARCHS = ["transcoder", "skip_transcoder"]


def _sae(arch, seed=0):
    rng = np.random.default_rng(seed)
    spec = SAESpec(arch, D, D_SAE, k=K, aux_k=AUX_K)
    sae = init_sae(jax.random.key(seed), spec, None, b_dec_init="zeros")
    p = {n: v + 0.2 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    x = rng.standard_normal((32, D)).astype(np.float32)
    y = (x @ rng.standard_normal((D, D)) * 0.5 + rng.standard_normal((32, D))).astype(np.float32)
    return sae.replace(params=p), x, y


def _np_loss(p, x, y, *, skip, dead=None, frozen=None, aux_coef=1 / 32):
    """Reference in float64: recon + aux_coef * AuxK (the residual is a constant: ``frozen``),
    both in output units (x out_scale s): x_hat = (z W_dec + x W_skip) / s + b_dec."""
    s = float(p.get("out_scale", 1.0))

    def forward(q):
        pre = x @ q["W_enc"] + q["b_enc"]
        kth = np.sort(pre, axis=-1)[:, -K][:, None]
        z = np.where(pre >= kth, np.maximum(pre, 0.0), 0.0)
        x_hat = ((z @ q["W_dec"] + (x @ q["W_skip"] if skip else 0.0)) / float(q.get("out_scale", 1.0))
                 + q["b_dec"])
        return pre, x_hat

    pre, x_hat = forward(p)
    loss = np.mean(np.sum(((x_hat - y) * s) ** 2, axis=-1))
    if dead is not None and dead.any():
        residual = y - forward(frozen if frozen is not None else p)[1]
        masked = np.where(dead, pre, -np.inf)
        kth = np.sort(masked, axis=-1)[:, -AUX_K][:, None]
        z_aux = np.where((masked >= kth) & np.isfinite(masked), np.maximum(masked, 0.0), 0.0)
        s_res = float(frozen.get("out_scale", s)) if frozen is not None else s  # a constant too
        loss += aux_coef * np.mean(np.sum((z_aux @ p["W_dec"] - residual * s_res) ** 2, axis=-1))
    return loss


def _np_params(sae):
    return {n: np.asarray(v, np.float64) for n, v in sae.params.items()}


DEAD = np.zeros(D_SAE, bool)
DEAD[::2] = True


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_matches_numpy(arch):
    sae, x, y = _sae(arch)
    skip = arch == "skip_transcoder"
    for dead in (None, DEAD):
        loss, aux = sae_loss(sae, jnp.asarray(x), x_target=jnp.asarray(y), sparsity_coef=0.0,
                             dead_mask=None if dead is None else jnp.asarray(dead))
        ref = _np_loss(_np_params(sae), x.astype(np.float64), y.astype(np.float64), skip=skip,
                       dead=dead)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
        assert int((np.asarray(aux["z"]) != 0).sum(-1).max()) <= K
    assert ("W_skip" in sae.params) == skip


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_finite_differences(arch):
    sae, x, y = _sae(arch, seed=1)
    skip = arch == "skip_transcoder"
    grads = jax.jit(jax.grad(lambda prm: sae_loss(sae.replace(params=prm), jnp.asarray(x),
                                          x_target=jnp.asarray(y), sparsity_coef=0.0,
                                          dead_mask=jnp.asarray(DEAD))[0]))(sae.params)
    p0 = _np_params(sae)
    frozen = {n: v.copy() for n, v in p0.items()}
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    rng = np.random.default_rng(2)
    h = 1e-5
    for name in p0:
        for _ in range(5):
            idx = tuple(rng.integers(0, s) for s in p0[name].shape)
            plus = {n: v.copy() for n, v in p0.items()}
            minus = {n: v.copy() for n, v in p0.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            ref = (_np_loss(plus, xd, yd, skip=skip, dead=DEAD, frozen=frozen)
                   - _np_loss(minus, xd, yd, skip=skip, dead=DEAD, frozen=frozen)) / (2 * h)
            got = float(np.asarray(grads[name])[idx])
            assert got == pytest.approx(ref, rel=1e-2, abs=1e-3), (name, idx)


def test_skip_zero_init_equals_plain_and_needs_x_in():
    plain, x, _ = _sae("transcoder")
    spec = SAESpec("skip_transcoder", D, D_SAE, k=K, aux_k=AUX_K)
    fresh = init_sae(jax.random.key(0), spec, None, b_dec_init="zeros")
    assert fresh.params["W_skip"].shape == (D, D) and not np.any(np.asarray(fresh.params["W_skip"]))
    skip = SAE(params={**plain.params, "W_skip": jnp.zeros((D, D))}, norm_scale=plain.norm_scale,
               spec=spec)
    xs = jnp.asarray(x)
    for sae in (plain, skip):
        z = encode_normalized(sae, xs)
        out = decode_normalized(sae, z, xs)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(decode_normalized(plain, encode_normalized(plain, xs))),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs its encoded input x_in"):
        decode_normalized(skip, z)
    # W_skip is one matrix for all latents: replicated, never split over `model`
    assert parallel.spec_for_path((jax.tree_util.DictKey("W_skip"),), skip.params["W_skip"]) == \
        jax.sharding.PartitionSpec()


def test_fold_norm_preserves_skip_transcoder():
    sae, x, _ = _sae("skip_transcoder")
    sae = sae.replace(norm_scale=jnp.asarray(0.37, jnp.float32))
    folded = fold_norm(sae)
    xs = jnp.asarray(x)
    for s in (sae, folded):
        z = encode(s, xs)
        out = decode_normalized(s, z, xs * s.norm_scale) / s.norm_scale
        if s is sae:
            z0, out0 = z, out
    np.testing.assert_allclose(np.asarray(z), np.asarray(z0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out0), rtol=1e-5, atol=1e-5)


def _subspaces(rng, d, m):
    """Orthonormal row bases of a random m-dim subspace S of R^d and of its complement."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:, :m].T, q[:, m:].T


def _synthetic(rng, n, E, S_perp, A, Dm, k_true, noise):
    """x_in = c E + g (c: k_true-sparse code, E's rows span S; g dense in S's complement);
    x_target = x_in A + c Dm."""
    m = E.shape[0]
    active = np.argsort(rng.random((n, m)), axis=1)[:, :k_true]
    c = np.zeros((n, m))
    np.put_along_axis(c, active, rng.uniform(1.0, 2.0, (n, k_true)), axis=1)
    x_in = c @ E + noise * rng.standard_normal((n, S_perp.shape[0])) @ S_perp
    return x_in.astype(np.float32), (x_in @ A + c @ Dm).astype(np.float32)


def _train(arch, x, y, *, d_sae, k, steps=500, lr=1e-2):
    spec = SAESpec(arch, x.shape[1], d_sae, k=k)
    sae = init_sae(jax.random.key(0), spec, None, b_dec_init="zeros")
    opt = optax.adam(lr)
    frozen = get_arch(arch).frozen_params  # set from the init sample, not by the gradient

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_of(prm):
            return sae_loss(sae.replace(params=prm), xb, x_target=yb, sparsity_coef=0.0)[0]
        g = jax.grad(loss_of)(params)
        g = {n: jnp.zeros_like(v) if n in frozen else v for n, v in g.items()}  # as the trainer
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        w = params["W_dec"]  # unit decoder rows, as the trainer keeps them
        return {**params, "W_dec": w / jnp.linalg.norm(w, axis=-1, keepdims=True)}, opt_state

    params, opt_state = sae.params, opt.init(sae.params)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    for i in range(steps):
        j = (i * 256) % (len(x) - 256)
        params, opt_state = step(params, opt_state, xs[j:j + 256], ys[j:j + 256])
    return sae.replace(params=params)


def _fvu(sae, x, y):
    xs = jnp.asarray(x)
    y_hat = np.asarray(decode_normalized(sae, encode_normalized(sae, xs), xs))
    return float(np.sum((y_hat - y) ** 2) / np.sum((y - y.mean(0)) ** 2))


def test_transcoder_recovers_linear_plus_sparse_map():
    # 16 unit features (3 active per token, values in [1, 2]) spanning a 16-dim subspace S of
    # R^32, plus dense Gaussian g (std 0.5) in S's complement; target = x_in A + c Dm. The
    # linear g A is dense (16 dims, full rank): only the skip connection can carry it, so
    # W_skip must equal A on S's complement (on S, c E A could equally be written by the
    # latents), and the latents explain the sparse rest. 500 Adam steps, batch 256.
    rng = np.random.default_rng(0)
    d, m, k_true = 32, 16, 3
    S, S_perp = _subspaces(rng, d, m)
    E = rng.standard_normal((m, m)) @ S
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    Dm = rng.standard_normal((m, d)) / np.sqrt(d)
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    data = {noise: (_synthetic(rng, 8192, E, S_perp, A, Dm, k_true, noise),
                    _synthetic(rng, 2048, E, S_perp, A, Dm, k_true, noise))
            for noise in (0.0, 0.5)}
    (x_tr, y_tr), (x_te, y_te) = data[0.5]

    skip = _train("skip_transcoder", x_tr, y_tr, d_sae=32, k=k_true + 1)
    fvu_skip = _fvu(skip, x_te, y_te)
    w_skip = np.asarray(skip.params["W_skip"], np.float64)
    w_err = np.linalg.norm(S_perp @ (w_skip - A)) / np.linalg.norm(S_perp @ A)
    assert fvu_skip < 0.01, fvu_skip  # measured 0.0019
    assert w_err < 0.05, w_err  # measured 0.0096

    plain = _train("transcoder", x_tr, y_tr, d_sae=32, k=k_true + 1)
    fvu_lost = _fvu(plain, x_te, y_te)
    assert fvu_lost > 0.05, fvu_lost  # measured 0.15: without the skip, g A is lost
    # without the dense part the map is sparse, c (E A + Dm): a plain transcoder recovers it
    (x_tr, y_tr), (x_te, y_te) = data[0.0]
    plain = _train("transcoder", x_tr, y_tr, d_sae=32, k=k_true + 1)
    fvu_plain = _fvu(plain, x_te, y_te)
    assert fvu_plain < 0.05, fvu_plain  # measured 0.012


JUMP_ARCHS = ["jumprelu_transcoder", "jumprelu_skip_transcoder"]


def _jump_sae(arch, seed=0):
    sae, x, y = _sae_for(arch, seed)
    p = dict(sae.params)
    p["log_threshold"] = jnp.log(jnp.full((D_SAE,), 0.3, jnp.float32))
    return sae.replace(params=p), x, y


def _sae_for(arch, seed):
    rng = np.random.default_rng(seed)
    spec = SAESpec(arch, D, D_SAE)
    sae = init_sae(jax.random.key(seed), spec, None, b_dec_init="zeros")
    p = {n: v + 0.2 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    x = rng.standard_normal((32, D)).astype(np.float32)
    y = (x @ rng.standard_normal((D, D)) * 0.5 + rng.standard_normal((32, D))).astype(np.float32)
    return sae.replace(params=p), x, y


def _np_jump(p, x, y, *, skip, coef):
    """JumpReLU transcoder loss (step L0 term), float64, in output units (x out_scale s)."""
    s = float(p.get("out_scale", 1.0))
    pre = x @ p["W_enc"] + p["b_enc"]
    theta = np.exp(p["log_threshold"])
    z = np.where(pre > theta, pre, 0.0)
    x_hat = (z @ p["W_dec"] + (x @ p["W_skip"] if skip else 0.0)) / s + p["b_dec"]
    return (np.mean(np.sum(((x_hat - y) * s) ** 2, -1)) + coef * np.mean(np.sum(pre > theta, -1)),
            z, x_hat)


@pytest.mark.parametrize("arch", JUMP_ARCHS)
def test_jumprelu_transcoder_loss_and_decoder_gradients(arch):
    sae, x, y = _jump_sae(arch)
    skip = arch == "jumprelu_skip_transcoder"
    loss_fn = jax.jit(lambda prm: sae_loss(sae.replace(params=prm), jnp.asarray(x),
                                           x_target=jnp.asarray(y), sparsity_coef=0.3))
    loss, aux = loss_fn(sae.params)
    p0 = _np_params(sae)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    ref, z_ref, _ = _np_jump(p0, xd, yd, skip=skip, coef=0.3)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["z"]), z_ref, rtol=1e-5, atol=1e-5)
    assert 0 < np.mean(z_ref != 0) < 1
    # the parameters after the activation have exact gradients (the others are straight-through
    # estimates, tested for `jumprelu` in tests/test_sae_core.py)
    grads = jax.jit(jax.grad(lambda prm: loss_fn(prm)[0]))(sae.params)
    rng = np.random.default_rng(3)
    h = 1e-5
    for name in ("W_dec", "b_dec") + (("W_skip",) if skip else ()):
        for _ in range(5):
            idx = tuple(rng.integers(0, n) for n in p0[name].shape)
            plus = {n: v.copy() for n, v in p0.items()}
            minus = {n: v.copy() for n, v in p0.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd = (_np_jump(plus, xd, yd, skip=skip, coef=0.3)[0]
                  - _np_jump(minus, xd, yd, skip=skip, coef=0.3)[0]) / (2 * h)
            assert float(np.asarray(grads[name])[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-4)


_SAELENS_SCRIPT = r"""
import json, sys
import numpy as np, torch
from sae_lens import SAE
root = sys.argv[1]
x = torch.from_numpy(np.load(f"{root}/x.npy"))
report = {}
for name in json.loads(open(f"{root}/names.json").read()):
    sae = SAE.load_from_disk(f"{root}/{name}")
    with torch.no_grad():
        np.save(f"{root}/{name}.z.npy", sae.encode(x).numpy())
        np.save(f"{root}/{name}.out.npy", sae(x).numpy())
    report[name] = {"cls": type(sae).__name__, "d_out": sae.cfg.d_out}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_export_loads_in_real_saelens(tmp_path):
    saelens_python()
    saes, x = {}, None
    for i, arch in enumerate(JUMP_ARCHS):
        sae, x, _ = _jump_sae(arch, seed=i)
        saes[arch] = sae.replace(norm_scale=jnp.asarray(0.4, jnp.float32))  # folded on export
        save_saelens(saes[arch], tmp_path / arch, hook_name="blocks.6.hook_resid_mid",
                     model_name="gemma-3-270m")
    x = 3.0 * x
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "names.json").write_text(json.dumps(JUMP_ARCHS))
    report = run_saelens(_SAELENS_SCRIPT, tmp_path)
    assert report == {"jumprelu_transcoder": {"cls": "JumpReLUTranscoder", "d_out": D},
                      "jumprelu_skip_transcoder": {"cls": "JumpReLUSkipTranscoder", "d_out": D}}
    for arch, sae in saes.items():
        xs = jnp.asarray(x)
        z = encode(sae, xs)
        y_hat = decode_normalized(sae, encode_normalized(sae, xs * sae.norm_scale),
                                  xs * sae.norm_scale) / sae.norm_scale
        assert 0 < np.mean(np.asarray(z) != 0) < 1
        np.testing.assert_allclose(np.load(tmp_path / f"{arch}.z.npy"), np.asarray(z),
                                   rtol=1e-4, atol=1e-4, err_msg=arch)
        np.testing.assert_allclose(np.load(tmp_path / f"{arch}.out.npy"), np.asarray(y_hat),
                                   rtol=1e-4, atol=1e-4, err_msg=arch)


@pytest.mark.parametrize("arch", ARCHS + JUMP_ARCHS)
def test_out_scale_from_the_init_sample_and_absent_in_older_folders(arch):
    """out_scale makes the init sample's targets unit scale (E||s y_n||^2 = d_in) whatever the
    input's norm; a dictionary without it (written before it existed, or imported) reads as 1."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((512, D)).astype(np.float32) * 0.1  # small inputs (post-norm)
    y = rng.standard_normal((512, D)).astype(np.float32) * 300.0  # large outputs (an MLP's)
    spec = SAESpec(arch, D, D_SAE, **({"k": K} if arch in ARCHS else {}))
    sae = init_sae(jax.random.key(0), spec, jnp.asarray(x),
                   target_sample=jnp.asarray(y))
    y_n = y.astype(np.float64) * float(sae.norm_scale) * float(sae.params["out_scale"])
    assert np.mean(np.sum(y_n ** 2, -1)) == pytest.approx(D, rel=1e-4)
    assert "out_scale" in get_arch(arch).frozen_params
    old = sae.replace(params={n: v for n, v in sae.params.items() if n != "out_scale"})
    ones = sae.replace(params={**sae.params, "out_scale": jnp.ones(())})
    xs = jnp.asarray(x)
    np.testing.assert_allclose(np.asarray(decode_normalized(old, encode_normalized(old, xs), xs)),
                               np.asarray(decode_normalized(ones, encode_normalized(ones, xs), xs)))
    folded = fold_norm(sae)  # exports see plain weights: the same outputs with out_scale 1
    assert float(folded.params["out_scale"]) == 1.0
    np.testing.assert_allclose(
        np.asarray(decode_normalized(folded, encode(folded, xs), xs * folded.norm_scale)
                   / folded.norm_scale),
        np.asarray(decode_normalized(sae, encode(sae, xs), xs * sae.norm_scale) / sae.norm_scale),
        rtol=1e-4, atol=1e-3)

"""Cross-layer transcoders (jsae/sae/archs/clt.py): the loss and its gradients against a NumPy
reimplementation for each activation, causality (layer t never reads a later layer; masked
decoder entries get no gradient and stay zero), recovery of planted cross-layer features and
their layer profile, 8 simulated devices against one, and the save / load round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsae.sae import SAESpec, init_sae, sae_loss
from jsae.sae.archs import OptionError, get_arch
from jsae.sae.core import decode_normalized, encode_normalized, fold_norm
from jsae.train.run import Run
from jsae.train.state import init_state
from jsae.train.step import make_train_step

L, D, N = 3, 6, 4  # layers, width, features per layer
B = 16
ACTS = ("jumprelu", "topk", "batchtopk")


# ---- the NumPy reference, written from the formulas ------------------------------------

def np_pre(p, x):
    """[B, L * N]: layer l's features read x[:, l] only, at that layer's input scale."""
    return np.concatenate([p["in_scale"][l] * x[:, l] @ p["W_enc"][l]
                           + p["b_enc"][l * N:(l + 1) * N] for l in range(L)], axis=1)


def np_codes(p, pre, o):
    z = np.zeros_like(pre)
    for l in range(L):
        blk = pre[:, l * N:(l + 1) * N]
        if o["activation"] == "jumprelu":
            theta = np.exp(p["log_threshold"][l * N:(l + 1) * N])
            z[:, l * N:(l + 1) * N] = np.where(blk > theta, blk, 0.0)
        elif o["activation"] == "topk":  # the k largest of this layer, per token
            for b in range(len(pre)):
                keep = np.argsort(-blk[b], kind="stable")[:o["k"]]
                z[b, l * N + keep] = np.maximum(blk[b, keep], 0)
        else:  # batchtopk in training: the k * B largest of this layer over the batch
            a = np.maximum(blk, 0).reshape(-1)
            keep = np.argsort(-a, kind="stable")[:o["k"] * len(pre)]
            sel = np.zeros_like(a)
            sel[keep] = a[keep]
            z[:, l * N:(l + 1) * N] = sel.reshape(blk.shape)
    return z


def np_write(p, z):
    """sum over l <= t of z_l W_dec[l-block, t], for every target layer t: [B, L, D] (in each
    layer's output units: y_hat_t = write_t / out_scale_t + b_dec_t)."""
    out = np.zeros((len(z), L, D))
    for t in range(L):
        for l in range(t + 1):
            out[:, t] += z[:, l * N:(l + 1) * N] @ p["W_dec"][l * N:(l + 1) * N, t]
    return out


def np_dec_norms(p):
    """The norm of each feature's whole decoder, over the layers it writes (t >= l)."""
    return np.array([np.sqrt(sum(np.sum(p["W_dec"][i, t] ** 2) for t in range(i // N, L)))
                     for i in range(L * N)])


def np_loss(p, x, y, o, coef, dead, aux_coef=0.5, aux_k=3, residual=None):
    """(total, terms, pre, z, y_hat); ``residual``: AuxK's target held fixed (stop-gradient)."""
    pre = np_pre(p, x)
    z = np_codes(p, pre, o)
    s_out = p["out_scale"][:, None]  # [L, 1]
    y_hat = np_write(p, z) / s_out + p["b_dec"]
    nb = len(x)
    terms = {"recon": np.sum(((y_hat - y) * s_out) ** 2) / nb}
    nrm = np_dec_norms(p)
    if o["activation"] == "jumprelu":
        theta = np.exp(p["log_threshold"])
        l0 = np.sum(pre > theta, axis=1)
        mode = o["jumprelu_sparsity"]
        if mode == "tanh":
            s = np.sum(np.tanh(o["jumprelu_tanh_scale"] * np.abs(z) * nrm)) / nb
        elif mode == "step":
            s = np.sum(l0) / nb
        else:
            s = np.mean(2.0 / o["target_l0"] * (l0 - o["target_l0"]) ** 2)
        terms["sparsity"] = coef * s
    else:
        theta = np.zeros(L * N)
        res = y - y_hat if residual is None else residual
        masked = np.where(dead, pre, -np.inf)
        z_aux = np.zeros_like(pre)
        for b in range(nb):
            keep = np.argsort(-masked[b], kind="stable")[:aux_k]
            v = masked[b, keep]
            z_aux[b, keep] = np.where(np.isfinite(v), np.maximum(v, 0), 0)
        terms["auxk"] = aux_coef * np.sum((np_write(p, z_aux) - res * s_out) ** 2) / nb
    if o["preact_coef"]:
        terms["preact"] = o["preact_coef"] * np.sum(np.maximum(theta - pre, 0) * nrm) / nb
    return sum(terms.values()), terms, pre, z, y_hat


def np_threshold_grad(p, x, y, o, coef, eps):
    """d loss / d log_threshold with JumpReLU's straight-through pseudo-derivatives:
    d z / d theta = -(theta / eps) K((pre - theta) / eps), d H / d theta = -(1 / eps) K(...)."""
    _, _, pre, z, y_hat = np_loss(p, x, y, o, coef, None)
    nb = len(x)
    theta = np.exp(p["log_threshold"])
    kern = (np.abs((pre - theta) / eps) < 0.5).astype(float)
    nrm = np_dec_norms(p)
    g_z = np.zeros_like(z)  # true d loss / d z of the terms that read z
    for t in range(L):
        for l in range(t + 1):
            g_z[:, l * N:(l + 1) * N] += 2.0 / nb * p["out_scale"][t] * (
                y_hat[:, t] - y[:, t]) @ p["W_dec"][l * N:(l + 1) * N, t].T
    c = o["jumprelu_tanh_scale"]
    if o["jumprelu_sparsity"] == "tanh":  # z >= 0, so d|z|/dz = 1
        g_z += coef / nb * c * nrm * (1 - np.tanh(c * np.abs(z) * nrm) ** 2)
    g = np.sum(g_z * -(theta / eps) * kern, axis=0)
    if o["jumprelu_sparsity"] == "step":
        g += coef / nb * np.sum(-kern / eps, axis=0)
    elif o["jumprelu_sparsity"] == "quadratic":
        l0 = np.sum(pre > theta, axis=1, keepdims=True)
        g += coef / nb * np.sum(4.0 / o["target_l0"] * (l0 - o["target_l0"]) * -kern / eps, 0)
    if o["preact_coef"]:
        g += o["preact_coef"] / nb * np.sum((theta > pre) * nrm, axis=0)
    return g * theta  # chain rule to log_threshold


# ---- fixtures ------------------------------------------------------------------------

def _options(activation, sparsity="tanh", preact=0.3):
    o = dict(activation=activation, k=2, jumprelu_sparsity=sparsity, jumprelu_tanh_scale=2.0,
             jumprelu_bandwidth=0.5, target_l0=3.0, preact_coef=preact)
    return o


def _sae(o, seed=0):
    """A CLT with random weights (masked decoder entries zero) and thresholds near the codes."""
    spec = SAESpec("clt", D, L * N, aux_k=3, n_layers=L, **o)
    sae = init_sae(jax.random.key(seed), spec, None)
    rng = np.random.default_rng(seed)
    p = {n: v + 0.3 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
         for n, v in sae.params.items()}
    w = np.asarray(p["W_dec"]).copy()
    for i in range(L * N):
        w[i, :i // N] = 0.0
    p["W_dec"] = jnp.asarray(w)
    if "log_threshold" in p:
        p["log_threshold"] = jnp.asarray(np.log(rng.uniform(0.2, 0.6, L * N)), jnp.float32)
    for name in ("in_scale", "out_scale"):  # layers of different sizes
        p[name] = jnp.asarray(rng.uniform(0.5, 2.0, L), jnp.float32)
    return sae.replace(params=p)


def _data(seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, L, D)).astype(np.float32),
            rng.standard_normal((B, L, D)).astype(np.float32))


DEAD = np.arange(L * N) % 3 == 0  # AuxK needs dead latents


CASES = [("jumprelu", "tanh"), ("jumprelu", "step"), ("jumprelu", "quadratic"),
         ("topk", None), ("batchtopk", None)]


@pytest.mark.parametrize("activation,sparsity", CASES)
def test_loss_and_gradients_match_numpy(activation, sparsity):
    o = _options(activation, sparsity or "tanh")
    sae = _sae(o)
    x, y = _data()
    coef = 0.2
    loss, aux = sae_loss(sae, jnp.asarray(x), x_target=jnp.asarray(y), sparsity_coef=coef,
                         dead_mask=jnp.asarray(DEAD), aux_coef=0.5)
    p = {n: np.asarray(v, np.float64) for n, v in sae.params.items()}
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    ref, terms, _, z, y_hat = np_loss(p, x64, y64, o, coef, DEAD)
    assert set(terms) | {"z", "x_hat", "pre"} == set(aux)
    for name, v in terms.items():
        assert float(aux[name]) == pytest.approx(v, rel=1e-4, abs=1e-6), name
    assert float(loss) == pytest.approx(ref, rel=1e-4)
    np.testing.assert_allclose(np.asarray(aux["z"]), z, rtol=1e-4, atol=1e-5)
    assert 0 < np.mean(z > 0) < 1

    grads = jax.grad(lambda q: sae_loss(
        sae.replace(params=q), jnp.asarray(x), x_target=jnp.asarray(y), sparsity_coef=coef,
        dead_mask=jnp.asarray(DEAD), aux_coef=0.5)[0])(sae.params)
    residual = y64 - y_hat  # AuxK's target is a constant (stop-gradient), held here too
    rng = np.random.default_rng(2)
    h = 1e-6
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        idxs = [tuple(rng.integers(0, s) for s in p[name].shape) for _ in range(6)]
        if name == "W_dec":  # masked entries too: a layer-2 feature writing to layer 0
            idxs += [(2 * N + 1, 0, 3), (N, 0, 0)]
        for idx in idxs:
            plus = {n: v.copy() for n, v in p.items()}
            minus = {n: v.copy() for n, v in p.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd = (np_loss(plus, x64, y64, o, coef, DEAD, residual=residual)[0]
                  - np_loss(minus, x64, y64, o, coef, DEAD, residual=residual)[0]) / (2 * h)
            got = float(np.asarray(grads[name])[idx])
            assert got == pytest.approx(fd, rel=2e-3, abs=2e-4), (name, idx)
    w_grad = np.asarray(grads["W_dec"])
    assert all(np.all(w_grad[i, :i // N] == 0) for i in range(L * N))  # exactly zero
    if activation == "jumprelu":
        want = np_threshold_grad(p, x64, y64, o, coef, 0.5)
        np.testing.assert_allclose(np.asarray(grads["log_threshold"]), want, rtol=1e-3,
                                   atol=1e-5)
        assert np.count_nonzero(want) > 3


@pytest.mark.parametrize("activation", ACTS)
def test_a_layer_never_reads_a_later_layer(activation):
    """Changing the inputs of layers > t leaves layer t's reconstruction unchanged (training
    and inference selections alike)."""
    sae = _sae(_options(activation))
    rng = np.random.default_rng(5)
    # garbage in the masked entries (an imported decoder, say): the forward must ignore them
    w = np.asarray(sae.params["W_dec"]) + rng.standard_normal((L * N, L, D)).astype(np.float32)
    extra = {"ema_threshold": jnp.full((L * N,), 0.2)} if activation == "batchtopk" else {}
    sae = sae.replace(params={**sae.params, "W_dec": jnp.asarray(w), **extra})
    x, _ = _data()
    for train in (False, True):
        def recon(x_in, train=train):
            return np.asarray(decode_normalized(sae, encode_normalized(
                sae, jnp.asarray(x_in), train=train)))

        base = recon(x)
        for t in range(L - 1):
            x2 = x.copy()
            x2[:, t + 1:] = 5 * rng.standard_normal(x2[:, t + 1:].shape)
            out = recon(x2)
            np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
            assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def _step_fn(lr=1e-2, mesh=None, coef=0.05):
    opt = optax.adam(lr)
    return opt, make_train_step(opt, optax.constant_schedule(coef), optax.constant_schedule(lr),
                                dead_after_tokens=64, mesh=mesh)


@pytest.mark.parametrize("activation", ACTS)
def test_masked_decoder_entries_stay_zero_through_training(activation):
    x, y = _data()
    sae = init_sae(jax.random.key(0), SAESpec("clt", D, L * N, n_layers=L,
                                              **_options(activation)), x, target_sample=y)
    w0 = np.asarray(sae.params["W_dec"])
    assert all(np.all(w0[i, :i // N] == 0) and np.all(w0[i, i // N:] != 0) for i in range(L * N))
    for name, v in (("in_scale", x), ("out_scale", y)):  # E||scale_l v_l||^2 = d per layer
        v_n = v * float(sae.norm_scale) * np.asarray(sae.params[name])[:, None]
        np.testing.assert_allclose(np.mean(np.sum(v_n ** 2, -1), 0), D, rtol=1e-4)
    opt, step = _step_fn()
    state = init_state(sae, opt, jax.random.key(1))
    step = jax.jit(step)
    for _ in range(5):
        state, m = step(state, jnp.asarray(x), jnp.asarray(y))
    w = np.asarray(state.sae.params["W_dec"])
    assert all(np.all(w[i, :i // N] == 0) for i in range(L * N))
    assert not np.allclose(w, w0) and np.isfinite(float(m["loss"]))
    for name in ("in_scale", "out_scale"):  # frozen: not moved by the gradient
        np.testing.assert_array_equal(state.sae.params[name], sae.params[name])
    if activation == "batchtopk":  # the EMA set each layer's inference threshold
        thr = np.asarray(state.sae.params["ema_threshold"]).reshape(L, N)
        assert np.all(thr > 0) and np.all(thr == thr[:, :1])


# ---- recovery -------------------------------------------------------------------------

class _Planted:
    """Features planted at each layer: feature f of layer l reads direction u_f of x_l and
    writes profile[l][t] * v_{f,t} (unit v) into y_t for t >= l. One or two per layer per token."""

    n_true, d = 6, 16
    profiles = {0: [0.6, 0.3, 0.1], 1: [0.0, 0.8, 0.2], 2: [0.0, 0.0, 1.0]}

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        nf, d = self.n_true, self.d
        u = rng.standard_normal((L, nf, d))
        self.u = u / np.linalg.norm(u, axis=-1, keepdims=True)
        v = rng.standard_normal((L, nf, L, d))
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        prof = np.array([self.profiles[l] for l in range(L)])  # [L src, L tgt]
        self.w = v * prof[:, None, :, None]  # [L, nf, L, d]; zero for t < l
        self.rng = np.random.default_rng(seed + 1)

    def batch(self, n):
        order = np.argsort(self.rng.random((n, L, self.n_true)), axis=-1)  # random features
        on = order < self.rng.integers(1, 3, (n, L, 1))  # one or two of them
        c = on * self.rng.uniform(1, 2, on.shape)
        x = np.einsum("blf,lfd->bld", c, self.u)
        y = np.einsum("blf,lftd->btd", c, self.w)
        return x.astype(np.float32), y.astype(np.float32)


# jumprelu: a linear threshold reaches the sparsity in hundreds of Adam steps (see
# jsae/sae/archs/jumprelu.py); measured at seeds 0 and 1: topk min cosine 0.99, jumprelu median
# 0.97 (a few features still split), profile error of the found features <= 0.04
RECOVERY = {
    "topk": (dict(activation="topk", k=2), 1e-2, 0.0),
    "jumprelu": (dict(activation="jumprelu", jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.1,
                      jumprelu_sparsity="step", jumprelu_threshold="linear"), 3e-2, 0.1),
}


@pytest.mark.parametrize("activation", sorted(RECOVERY))
def test_recovers_planted_cross_layer_features_and_their_profile(activation):
    """Each planted feature is found (max cosine of the whole decoder) among the latents of
    its own layer, and its layer profile is the planted one."""
    src = _Planted()
    n = 12
    o, lr, coef = RECOVERY[activation]
    x, y = src.batch(512)
    sae = init_sae(jax.random.key(0), SAESpec("clt", src.d, L * n, n_layers=L, **o), x,
                   target_sample=y)
    opt, step = _step_fn(lr=lr, coef=coef)
    state = init_state(sae, opt, jax.random.key(1))
    step = jax.jit(step)
    for _ in range(400):
        state, m = step(state, *map(jnp.asarray, src.batch(128)))
    assert float(m["fvu"]) < 0.02, float(m["fvu"])
    sae = state.sae
    w = np.asarray(sae.params["W_dec"]).reshape(L * n, -1)
    w = w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    true = src.w.reshape(L * src.n_true, -1)
    true = true / np.linalg.norm(true, axis=-1, keepdims=True)
    cos = true @ w.T  # [true feature, learned latent]
    best = cos.argmax(1)
    assert np.median(cos.max(1)) > 0.95, np.round(cos.max(1), 2)
    if activation == "topk":
        assert cos.max(1).min() > 0.95, np.round(cos.max(1), 2)
    assert np.all(best // n == np.repeat(np.arange(L), src.n_true))  # found at its own layer
    prof = get_arch("clt").layer_profile(sae)[best]  # [true feature, target layer]
    # the planted profile in each target layer's own units (what the decoder is trained in)
    want = np.array([src.profiles[l] for l in range(L)]) * np.asarray(sae.params["out_scale"])
    want = np.repeat(want / want.sum(1, keepdims=True), src.n_true, axis=0)
    good = cos.max(1) > 0.9
    assert np.max(np.abs(prof[good] - want[good])) < 0.08, np.round(prof[good] - want[good], 2)


# ---- meshes, io, options -----------------------------------------------------------------

MESH = {"jumprelu": (2, 4), "topk": (4, 2), "batchtopk": (2, 4)}  # one each (CI time)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
@pytest.mark.parametrize("activation", ACTS)
def test_meshes_match_single_device(activation):
    """Three steps on 8 devices (latents split over ``model``) equal three on one."""
    from jsae import parallel

    n = 8  # features per layer: W_enc's last axis splits over model=4
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((32, L, D)).astype(np.float32),
                rng.standard_normal((32, L, D)).astype(np.float32)) for _ in range(3)]
    spec = SAESpec("clt", D, L * n, n_layers=L, aux_k=4, **_options(activation, preact=0.1))

    def train(data, model):
        mesh = parallel.make_mesh(data, model)
        opt, step = _step_fn(mesh=mesh)
        sae = init_sae(jax.random.key(0), spec, *batches[0][:1], target_sample=batches[0][1])
        state = init_state(sae, opt, jax.random.key(1))
        sh = parallel.tree_shardings(state, mesh)
        state = jax.device_put(state, sh)
        rows = parallel.batch_sharding(mesh, 3)
        fn = jax.jit(step, in_shardings=(sh, rows, rows),
                     out_shardings=(sh, parallel.replicated(mesh)))
        for x, y in batches:
            state, m = fn(state, jax.device_put(x, rows), jax.device_put(y, rows))
        if model > 1:  # the decoders (the bulk) are split over the latents
            assert state.sae.params["W_dec"].sharding.spec[0] == parallel.MODEL
            assert state.sae.params["W_enc"].sharding.spec[2] == parallel.MODEL
        return jax.device_get(state), jax.device_get(m)

    ref, ref_m = train(1, 1)
    for data, model in [MESH[activation]]:
        st, m = train(data, model)
        for name, v in ref.sae.params.items():
            np.testing.assert_allclose(st.sae.params[name], v, rtol=2e-4, atol=2e-5,
                                       err_msg=f"{name} mesh {data}x{model}")
        assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-4)


@pytest.mark.parametrize("activation", ACTS)
def test_save_load_round_trip(tmp_path, activation):
    from jsae.sae import reconstruct
    from jsae.sae.io import load_sae, save_sae

    sae = _sae(_options(activation))
    if activation == "batchtopk":
        sae = sae.replace(params={**sae.params, "ema_threshold": jnp.full((L * N,), 0.2)})
    save_sae(sae, tmp_path / "clt", {"hooks": ["a"]})
    back, meta = load_sae(tmp_path / "clt")
    assert back.spec == sae.spec and meta == {"hooks": ["a"]}
    assert set(back.params) == set(sae.params)
    x, _ = _data()
    want = np.asarray(reconstruct(sae, x))
    np.testing.assert_array_equal(np.asarray(reconstruct(back, x)), want)
    folded = fold_norm(sae.replace(norm_scale=jnp.asarray(1.7, jnp.float32)))
    assert np.all(np.asarray(folded.params["in_scale"]) == 1)
    np.testing.assert_allclose(np.asarray(reconstruct(folded, x / 1.7)) * 1.7,
                               np.asarray(reconstruct(sae, x)), rtol=1e-4, atol=1e-4)


def test_param_shapes_and_option_errors():
    arch = get_arch("clt")
    spec = SAESpec("clt", 640, 18 * 256, n_layers=18)
    assert arch.param_shapes(spec) == {"W_enc": (18, 640, 256), "W_dec": (18 * 256, 18, 640),
                                       "b_enc": (18 * 256,), "b_dec": (18, 640)}
    assert arch.token_shape(spec) == (18, 640) and arch.n_hooks(spec) == 18
    with pytest.raises(OptionError, match=r"'sae.d_sae': 100 latents do not split over the 3"):
        arch.check(arch.make_options({"n_layers": 3}), 100, "sae.d_sae")
    with pytest.raises(OptionError, match=r"'sae.k': k=40 exceeds the 32 features per layer"):
        arch.check(arch.make_options({"n_layers": 3, "activation": "topk", "k": 40}), 96)
    with pytest.raises(OptionError, match=r"'sae.target_l0'"):
        arch.check(arch.make_options({"jumprelu_sparsity": "quadratic"}), 96)
    with pytest.raises(OptionError, match=r"'sae.preact_coef': must be >= 0"):
        arch.check(arch.make_options({"preact_coef": -1.0}), 96)
    with pytest.raises(OptionError, match=r"'sae.activation'"):
        arch.check(arch.make_options({"activation": "relu"}), 96)


def test_plan_and_preflight_count_the_decoder_of_every_layer():
    """`jsae plan` and the preflight memory check size a CLT from its `param_shapes`: per
    latent d_in (encoder) + L * d_in (decoder) + 1, not a plain SAE's 2 d_in + 1."""
    from jsae.plan import param_tensors
    from jsae.train.preflight import params_per_latent, state_bytes

    L18, n, d = 18, 256, 640  # Gemma 3 270M, 256 features per layer
    spec = SAESpec("clt", d, L18 * n, n_layers=L18)
    t = param_tensors(spec)
    assert t["W_dec"] == {"shape": [L18 * n, L18, d], "bytes": L18 * n * L18 * d * 4,
                          "per_device": L18 * n * L18 * d * 4}
    assert t["W_enc"]["shape"] == [L18, d, n]
    assert params_per_latent(spec) == d + L18 * d + 1 + d / n
    plain = state_bytes(d, L18 * n, 64)
    clt = state_bytes(d, L18 * n, 64, params_per_latent=params_per_latent(spec))
    assert clt > 9 * (plain - 4 * 3 * d) / 2  # the decoder of 18 layers dominates


# ---- end to end: the trainer's set layout (sae.layers) feeds the CLT ---------------------

def test_trainer_fits_a_clt_from_one_lm_pass_and_plans_it(tmp_path):
    """`jsae train`'s loop on a tiny 3-layer model: sae.layers reads every layer's MLP input and
    reconstructs every MLP output; the saved CLT reloads with its masked decoder still zero,
    its held-out FVU is the NumPy one over the same rows, `jsae plan` sizes it, and resuming
    its checkpoint with another layer count is one line."""
    from test_steering_helpers import TinyModel, tiny_config
    from test_transcoder_sets import _raw, _source

    from jsae import config
    from jsae.plan import plan
    from jsae.runs import sae_from_run, stack_hooks
    from jsae.sae import reconstruct
    from jsae.train.checkpoint import CheckpointMismatchError, RunCheckpointer
    from jsae.train.loop import Trainer

    model = TinyModel(tiny_config(layers=3))
    raw = _raw(tmp_path, "clt", layers=[0, 1, 2], d_sae=48, k=4)
    raw["sae"].update(activation="topk")
    raw["checkpoint"] = {"enabled": True, "every_steps": 6, "keep": 1}
    cfg = config.from_dict(raw)
    src = _source(cfg, model)
    trainer = Trainer(cfg, src)
    (key,) = trainer.hooks
    spec = trainer.specs[key]
    assert spec.options.n_layers == 3 and spec.d_sae == 48
    summary = Run(cfg, log=lambda s: None).train(
        trainer, checkpointer=RunCheckpointer(cfg, trainer))
    sae, info = sae_from_run(tmp_path / "run")
    assert sae.spec == spec and info["layers"] == [0, 1, 2]
    w = np.asarray(sae.params["W_dec"])
    assert all(np.all(w[i, :i // 16] == 0) for i in range(48))
    rows = list(src.eval_batches(200, 4096))
    x = np.concatenate([stack_hooks(b, key) for b in rows])
    y = np.concatenate([stack_hooks(b, trainer.targets[key]) for b in rows]).astype(np.float64)
    y_hat = np.asarray(reconstruct(sae, jnp.asarray(x)), np.float64)
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert summary["heldout"][key]["fvu"] == pytest.approx(fvu, rel=1e-4)

    p = plan(config.from_dict(raw), 1, 1, d_in=model.cfg.d_model)
    d = model.cfg.d_model
    assert p.tensors[key]["W_dec"]["shape"] == [48, 3, d]
    assert p.batch == 6 * 128 * d * 4  # every layer's input and output hook

    two = config.from_dict({**raw, "sae": {**raw["sae"], "layers": [0, 1], "d_sae": 32},
                            "train": {**raw["train"], "steps": 8}})
    again = Trainer(two, _source(two, model))
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint .* trains hooks \['blocks.0"
                       r".*blocks.2.mlp.hook_in'\] but the config asks for \['blocks.0.mlp.hook_in"
                       r"\+blocks.1.mlp.hook_in'\]") as e:
        Run(two, log=lambda s: None).train(again, checkpointer=RunCheckpointer(two, again))
    assert "\n" not in str(e.value)


def test_a_features_direction_per_layer_is_its_raw_write():
    """steering.feature_direction(layer=t): the raw-unit change of layer t's reconstruction per
    unit of the code (the decoder row over out_scale and norm_scale)."""
    from jsae.sae import decode
    from jsae.steering import feature_direction

    sae = _sae(_options("topk")).replace(norm_scale=jnp.asarray(1.3, jnp.float32))
    f = N + 2  # a layer-1 feature
    z = jnp.zeros((1, L * N)).at[0, f].set(1.0)
    delta = np.asarray(decode(sae, z) - decode(sae, jnp.zeros((1, L * N))))[0]
    for t in range(L):
        np.testing.assert_allclose(np.asarray(feature_direction(sae, f, layer=t)), delta[t],
                                   rtol=1e-5, atol=1e-6)
    assert np.all(delta[0] == 0)  # it writes nothing before its own layer


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_clamping_a_clt_feature_writes_every_later_mlp_output_causally(activation):
    """steering.interventions_for on a CLT (its joined input/output keys): clamping feature f of
    layer l edits MLP outputs l..L-1 in the same forward. f's code reads only layer l's MLP
    input, which no edit reaches, so the steered forward must equal adding
    (value - z_f(unsteered input)) x its raw write at each output hook; layers before l
    are untouched; keep_error=False at layer l gives the CLT's edited reconstruction."""
    from test_steering_helpers import TinyModel, tiny_config

    from jsae import steering
    from jsae.models.transformer import forward
    from jsae.runs import KEY_JOIN
    from jsae.sae import decode, encode

    model = TinyModel(tiny_config(d=D * 4, layers=L))
    d = model.cfg.d_model
    spec = SAESpec("clt", d, L * N, aux_k=3, n_layers=L, **_options(activation))
    sae = init_sae(jax.random.key(3), spec, None)
    rng = np.random.default_rng(3)
    sae = sae.replace(params={**sae.params, "W_dec": sae.params["W_dec"] * 30.0})  # visible edits
    ins = [f"blocks.{i}.mlp.hook_in" for i in range(L)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    toks = jnp.asarray(rng.integers(3, 97, (2, 12)))
    base = forward(model.cfg, model.params, toks, capture=(*ins, *outs)).activations
    f, value = N + 1, 5.0  # a layer-1 feature
    x = jnp.stack([base[h] for h in ins], axis=-2)
    z_f = np.asarray(encode(sae, x))[..., f]

    fns = steering.interventions_for(sae, KEY_JOIN.join(ins), steering.clamp, [f], value,
                                     output_hook=KEY_JOIN.join(outs))
    assert sorted(fns) == outs[1:]  # nothing before the feature's own layer
    steered = forward(model.cfg, model.params, toks, interventions=fns, capture=tuple(outs)).logits

    def adds(j, new_code):
        delta = (new_code - z_f)[..., None] * np.asarray(steering.feature_direction(sae, f, layer=j))
        return lambda a: a + jnp.asarray(delta, a.dtype)

    ref = forward(model.cfg, model.params, toks,
                  interventions={outs[j]: adds(j, value) for j in range(1, L)}).logits
    np.testing.assert_allclose(np.asarray(steered), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(steered) - np.asarray(forward(model.cfg, model.params, toks).logits)).max() > 1e-2
    # scale (here 3x) and ablate go through the same edit: the code becomes factor x code
    assert (z_f != 0).any(), "feature f never fires: scaling it would test nothing"
    for transform, args, factor in ((steering.scale, ([f], 3.0), 3.0), (steering.ablate, ([f],), 0.0)):
        fns = steering.interventions_for(sae, KEY_JOIN.join(ins), transform, *args,
                                         output_hook=KEY_JOIN.join(outs))
        got = forward(model.cfg, model.params, toks, interventions=fns).logits
        ref = forward(model.cfg, model.params, toks,
                      interventions={outs[j]: adds(j, factor * z_f) for j in range(1, L)}).logits
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4,
                                   err_msg=transform.__name__)

    replaced = steering.interventions_for(sae, KEY_JOIN.join(ins), steering.clamp, [f], value,
                                          output_hook=KEY_JOIN.join(outs), keep_error=False)
    got = forward(model.cfg, model.params, toks, interventions=replaced, capture=(outs[1],)).activations
    z = encode(sae, x).at[..., f].set(value)
    np.testing.assert_allclose(np.asarray(got[outs[1]]), np.asarray(decode(sae, z))[..., 1, :],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ACTS)
def test_reconstruct_layer_equals_the_whole_clt_at_that_layer(activation):
    """Arch.reconstruct_layer (what the replacement eval splices at layer j) from the inputs of
    layers 0..j alone equals the whole CLT's reconstruction at layer j from all inputs."""
    from jsae.sae.core import reconstruct

    sae = _sae(_options(activation)).replace(norm_scale=jnp.asarray(0.7, jnp.float32))
    arch = get_arch("clt")
    x, _ = _data()
    full = np.asarray(reconstruct(sae, jnp.asarray(x)))
    for j in range(L):
        got = arch.reconstruct_layer(sae, jnp.asarray(x[:, : j + 1]) * sae.norm_scale, j) / sae.norm_scale
        np.testing.assert_allclose(np.asarray(got), full[:, j], rtol=1e-5, atol=1e-5)

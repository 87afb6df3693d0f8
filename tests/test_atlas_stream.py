"""The atlas's streaming pass against a brute-force NumPy computation over the whole corpus:
densities, means, maxima, histograms, top-k contexts with their windows (ties included),
quantile-band samples; also after an interrupted pass is resumed, and with latents sharded
over 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_steering_helpers import TinyModel, random_sae

from jsae.analysis.atlas.state import (
    AtlasState,
    StreamConfig,
    StreamResult,
    band_exponent,
    band_index,
    init_state,
    token_priority,
    update_state,
)
from jsae.analysis.atlas.stream import stream_text
from jsae.analysis.atlas.types import AtlasError, AtlasStateMismatch
from jsae.data.harvest import Harvester
from jsae.sae import encode

HOOK = "blocks.1.hook_resid_post"
CFG = StreamConfig(top_k=5, window=6, left=3, bands=4, band_samples=3, hist_bins=12,
                   hist_min=1e-3, hist_max=10.0, coact_tokens=64, coact_k=5)
BATCH = 4
# the arrays of a saved partial pass, in their order in the file, as written before the state
# was a dataclass (partial passes saved then must still resume)
SAVED_NAMES = ("band_act", "band_count", "band_ctx", "band_exp", "band_pos", "band_prio",
               "band_tok", "band_val", "coact", "coact_cand", "coact_cnt", "coact_fires",
               "coact_n", "coact_ready", "fires", "hist", "max", "n_tokens", "top_act", "top_ctx",
               "top_pos", "top_tok", "top_val", "total")


def stream_arrays(z_batches, cfg: StreamConfig = StreamConfig()) -> StreamResult:
    """The pass over precomputed codes: an iterable of ``(z [B, T, F], tokens, mask, ctx0)``
    (the reference the streamed passes are checked against)."""
    state = None
    n_ctx, T = 0, 0
    for z, tok, msk, ctx0 in z_batches:
        if state is None:
            state = jax.device_put(init_state(z.shape[-1], cfg))
        T = z.shape[1]
        state = update_state(state, jnp.asarray(z), jnp.asarray(tok, jnp.int32),
                             jnp.asarray(msk, bool), jnp.int32(ctx0), cfg=cfg)
        n_ctx = max(n_ctx, int(ctx0) + z.shape[0])
    host = jax.tree.map(np.asarray, jax.device_get(state))
    return StreamResult(cfg, int(host.n_tokens), n_ctx, T, host)


@pytest.fixture(scope="module")
def corpus():
    model = TinyModel()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 97, (22, 16)).astype(np.int32)
    tokens[:, 0] = 2  # BOS
    tokens[5] = tokens[1]  # identical contexts: tied maxima (the earlier context must win)
    tokens[13] = tokens[1]
    tokens[-1, 11:] = 0  # padding
    mask = ~np.isin(tokens, [0, 2])
    h = Harvester(model, [HOOK])
    acts = []
    for s in range(0, len(tokens), BATCH):  # the pass's batch shapes, so the codes are identical
        t = tokens[s : s + BATCH]
        pad = BATCH - len(t)
        t = np.concatenate([t, np.repeat(t[-1:], pad, 0)]) if pad else t
        acts.append(np.asarray(h.activations(t)[HOOK])[: BATCH - pad])
    acts = np.concatenate(acts)
    sae = random_sae("relu", model.cfg.d_model, 40, sample=acts.reshape(-1, acts.shape[-1]))
    z = np.concatenate([np.asarray(encode(sae, jnp.asarray(acts[s : s + BATCH])))
                        for s in range(0, len(tokens), BATCH)])
    z = np.where(mask[..., None], z, 0.0).astype(np.float32)
    return model, sae, tokens, mask, z


def reference(z, tokens, mask, cfg):
    """Everything the pass keeps, computed over the whole corpus at once."""
    N, T, F = z.shape
    K, W, L, Q, S = cfg.top_k, cfg.window, cfg.left_, cfg.bands, cfg.band_samples
    zt = np.transpose(z, (2, 0, 1))  # [F, N, T]
    out = {"fires": (zt > 0).sum((1, 2)), "max": zt.max((1, 2)), "total": zt.sum((1, 2))}
    lo, hi = np.log10(cfg.hist_min), np.log10(cfg.hist_max)
    hb = np.clip(np.floor((np.log10(np.maximum(zt, 1e-30)) - lo) * (cfg.hist_bins / (hi - lo))),
                 0, cfg.hist_bins - 1).astype(int)
    out["hist"] = np.stack([np.bincount(hb[f][zt[f] > 0], minlength=cfg.hist_bins) for f in range(F)])
    tok_pad = np.pad(tokens, ((0, 0), (L, W - L)), constant_values=-1)
    z_pad = np.pad(zt, ((0, 0), (0, 0), (L, W - L)))
    cmax, cpos = zt.max(2), zt.argmax(2)
    order = np.argsort(-cmax, axis=1, kind="stable")[:, :K]
    out["top_val"] = np.take_along_axis(cmax, order, 1)
    out["top_ctx"] = np.where(out["top_val"] > 0, order, -1)
    pos = np.take_along_axis(cpos, order, 1)
    out["top_pos"] = pos
    out["top_tok"] = np.stack([[tok_pad[c, p : p + W] for c, p in zip(order[f], pos[f])] for f in range(F)])
    out["top_act"] = np.stack([[z_pad[f, c, p : p + W] for c, p in zip(order[f], pos[f])] for f in range(F)])
    e = band_exponent(out["max"])
    gid = np.arange(N)[:, None] * T + np.arange(T)
    prio = token_priority(gid.astype(np.int32)).astype(np.int64)
    bands = []  # per feature: per band, the [(ctx, pos)] chosen and the count
    for f in range(F):
        fired = zt[f] > 0
        b = np.where(fired, band_index(zt[f], e[f], Q), Q)
        per = []
        for q in range(Q):
            cs, ps = np.nonzero(b == q)
            o = np.lexsort((gid[cs, ps], prio[cs, ps]))[:S]
            per.append(([(int(cs[i]), int(ps[i])) for i in o], len(cs)))
        bands.append(per)
    out["bands"] = bands
    return out


def check(res, ref, cfg, z, tokens_of):
    s = res.state
    np.testing.assert_array_equal(s.fires, ref["fires"])
    np.testing.assert_allclose(s.max, ref["max"], rtol=1e-6)
    np.testing.assert_allclose(s.total, ref["total"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(s.hist.sum(1), ref["hist"].sum(1))
    assert np.abs(s.hist - ref["hist"]).sum() <= 2  # a log10 ulp may move a code on an edge
    np.testing.assert_allclose(s.top_val, ref["top_val"], rtol=1e-6)
    np.testing.assert_array_equal(s.top_ctx, ref["top_ctx"])
    live = ref["top_ctx"] >= 0
    np.testing.assert_array_equal(s.top_pos[live], ref["top_pos"][live])
    np.testing.assert_array_equal(s.top_tok[live], ref["top_tok"][live])
    np.testing.assert_allclose(s.top_act[live].astype(np.float32),
                               ref["top_act"][live].astype(np.float16).astype(np.float32), rtol=1e-3,
                               atol=1e-7)  # float16 storage: subnormals are 6e-8 apart
    assert np.all(s.top_tok[~live] == -1)
    for f in range(z.shape[2]):
        for q in range(cfg.bands):
            want, count = ref["bands"][f][q]
            got = [(int(c), int(p)) for c, p, pr in
                   zip(s.band_ctx[f, q], s.band_pos[f, q], s.band_prio[f, q]) if pr != 0xFFFFFFFF]
            assert got == want, (f, q)
            assert s.band_count[f, q] == count
            for j, (c, p) in enumerate(got):
                v = s.band_val[f, q, j]
                np.testing.assert_allclose(v, z[c, p, f], rtol=1e-5, atol=1e-7)
                assert res.band_edges[f, q] <= v < res.band_edges[f, q + 1]
                L = cfg.left_
                assert s.band_tok[f, q, j, L] == tokens_of[c, p]
                np.testing.assert_allclose(float(s.band_act[f, q, j, L]), v, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("cap", [40, 3])  # 40: every token's codes sparse; 3: the dense path
def test_stream_text_equals_brute_force(corpus, cap):
    import dataclasses

    model, sae, tokens, mask, z = corpus
    cfg = dataclasses.replace(CFG, sparse_cap=cap)
    res = stream_text(model, {HOOK: sae}, tokens, mask, cfg, batch_size=BATCH, progress=False)[HOOK]
    ref = reference(z, tokens, mask, cfg)
    assert ((z > 0).sum(2).max() <= cap) == (cap == 40)
    assert res.n_tokens == mask.sum()
    check(res, ref, cfg, z, tokens)
    assert (ref["top_val"][:, 0] > 0).sum() > 20  # most features fire: the test means something
    # a tie really happened: some feature has contexts 1 and 5 (identical) among its top entries
    tied = [f for f in range(z.shape[2]) if {1, 5} <= set(ref["top_ctx"][f])]
    assert tied
    np.testing.assert_allclose(res.density, ref["fires"] / mask.sum())
    # the co-activation sample: the first counted tokens' active features
    rows = res.coact_rows()
    flat = z[mask][: cfg.coact_tokens]
    assert len(rows) == min(cfg.coact_tokens, mask.sum())
    for r, zz in zip(rows[:10], flat):
        want = np.argsort(-zz, kind="stable")[: cfg.coact_k]
        want = [int(i) for i in want if zz[i] > 0]
        assert [int(i) for i in r if i >= 0] == want


def test_band_samples_survive_rebinning():
    """Batches whose maxima grow (rebinning old bands) give the same samples as one batch."""
    rng = np.random.default_rng(1)
    N, T, F = 12, 8, 5
    z = (rng.random((N, T, F)) < 0.4) * rng.exponential(1.0, (N, T, F)).astype(np.float32)
    z *= np.linspace(0.05, 4, N)[:, None, None]  # growing scale: the max doubles several times
    z = z.astype(np.float32)
    tokens = rng.integers(3, 50, (N, T)).astype(np.int32)
    mask = np.ones((N, T), bool)
    cfg = StreamConfig(top_k=3, window=4, left=1, bands=5, band_samples=2, hist_bins=8,
                       coact_tokens=8, coact_k=3)
    one = stream_arrays([(z, tokens, mask, 0)], cfg)
    many = stream_arrays([(z[i : i + 2], tokens[i : i + 2], mask[i : i + 2], i) for i in range(0, N, 2)], cfg)
    check(many, reference(z, tokens, mask, cfg), cfg, z, tokens)
    for k in ("band_ctx", "band_pos", "band_count", "band_exp", "top_ctx", "band_tok"):
        np.testing.assert_array_equal(getattr(one.state, k), getattr(many.state, k), err_msg=k)


def test_resume_after_interrupt_equals_uninterrupted(corpus, tmp_path):
    model, sae, tokens, mask, z = corpus
    full = stream_text(model, {HOOK: sae}, tokens, mask, CFG, batch_size=BATCH, progress=False)[HOOK]
    d = tmp_path / "state"
    stream_text(model, {HOOK: sae}, tokens, mask, CFG, batch_size=BATCH, progress=False,
                state_dir=d, save_every=1, stop_after=3)
    with np.load(d / f"{HOOK}.state.npz") as saved:  # the layout of passes saved before
        assert saved.files == ["__meta__", *SAVED_NAMES]
    res = stream_text(model, {HOOK: sae}, tokens, mask, CFG, batch_size=BATCH, progress=False,
                      state_dir=d, save_every=2)[HOOK]
    for k in AtlasState.names():
        np.testing.assert_array_equal(getattr(res.state, k), getattr(full.state, k), err_msg=k)
    check(res, reference(z, tokens, mask, CFG), CFG, z, tokens)
    # the partial state of another dictionary is refused in one line
    other = random_sae("relu", model.cfg.d_model, 40, seed=7)
    with pytest.raises(AtlasStateMismatch, match="another dictionary") as e:
        stream_text(model, {HOOK: other}, tokens, mask, CFG, batch_size=BATCH, progress=False,
                    state_dir=d)
    assert "\n" not in str(e.value)


def test_sharded_latents_equal_single_device(corpus):
    from jsae.parallel import make_mesh

    model, sae, tokens, mask, z = corpus
    assert jax.device_count() == 8
    mesh = make_mesh(data=1, model=8)
    res = stream_text(model, {HOOK: sae}, tokens, mask, CFG, batch_size=BATCH, progress=False,
                      mesh=mesh)[HOOK]
    check(res, reference(z, tokens, mask, CFG), CFG, z, tokens)


def test_state_is_a_pytree_with_features_leading():
    """Every field is a leaf; exactly the per-feature fields (sharded over `model`) have the
    features as leading axis, and the state's sizes follow the config."""
    cfg = StreamConfig(top_k=3, window=5, bands=4, band_samples=2, hist_bins=6, coact_tokens=10,
                       coact_k=4, coact_candidates=3)
    st = init_state(7, cfg)
    assert len(jax.tree.leaves(st)) == len(SAVED_NAMES) and sorted(AtlasState.names()) == list(SAVED_NAMES)
    shared = set(AtlasState.names()) - set(AtlasState.per_feature())
    assert shared == {"coact", "coact_n", "coact_ready", "n_tokens"}
    for k in AtlasState.per_feature():
        assert getattr(st, k).shape[0] == 7, k
    assert st.top_tok.shape == (7, 3, 5) and st.band_act.shape == (7, 4, 2, 5)
    assert st.hist.shape == (7, 6) and st.coact.shape == (10, 4) and st.coact_cand.shape == (7, 3)
    assert init_state(2, cfg).coact_cand.shape == (2, 1)  # at most F - 1 partners


def test_bad_input_one_line(corpus):
    model, sae, tokens, mask, _ = corpus
    with pytest.raises(AtlasError, match="fewer than the top-k") as e:
        stream_text(model, {HOOK: sae}, tokens[:3], mask[:3], CFG, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(AtlasError, match="window"):
        stream_text(model, {HOOK: sae}, tokens[:, :4], mask[:, :4], CFG, progress=False)


@pytest.mark.parametrize("m", [3])  # few candidates per feature: the restriction matters
def test_coactivation_over_the_whole_pass_equals_numpy(corpus, m):
    """Whole-pass Jaccard neighbours (candidates from the sample, counted over every token)
    equal a dense NumPy computation over the whole corpus restricted to the candidates, which
    are each feature's m most frequent partners in the first coact_tokens tokens (NumPy too)."""
    import dataclasses

    from jsae.analysis.atlas.neighbours import coactivation_from_pass

    model, sae, tokens, mask, z = corpus
    cfg = dataclasses.replace(CFG, coact_candidates=m)
    res = stream_text(model, {HOOK: sae}, tokens, mask, cfg, batch_size=BATCH, progress=False)[HOOK]
    flat = z[mask]  # [n, F] counted tokens in corpus order
    F = flat.shape[1]
    A = np.zeros(flat.shape, bool)
    for t, zz in enumerate(flat):
        top = np.argsort(-zz, kind="stable")[: cfg.coact_k]
        A[t, top[zz[top] > 0]] = True
    S = A[: cfg.coact_tokens].astype(np.int64)
    co_s = S.T @ S
    np.fill_diagonal(co_s, 0)
    cand = np.full((F, m), -1)
    for f in range(F):
        order = np.lexsort((np.arange(F), -co_s[f]))
        order = order[co_s[f, order] > 0][:m]
        cand[f, : len(order)] = order
    np.testing.assert_array_equal(res.state.coact_cand, cand)
    Af = A.astype(np.int64)
    both, cnt = Af.T @ Af, Af.sum(0)
    assert len(flat) > 4 * cfg.coact_tokens  # most tokens lie past the sample
    ids, vals = coactivation_from_pass(res.state, 6)
    for f in range(F):
        g = cand[f][cand[f] >= 0]
        g = g[both[f, g] >= 2]
        J = both[f, g] / (cnt[f] + cnt[g] - both[f, g])
        order = np.lexsort((g, -J))[:6]
        np.testing.assert_array_equal(ids[f, : len(order)], g[order], err_msg=str(f))
        assert (ids[f, len(order):] == -1).all()
        np.testing.assert_allclose(vals[f, : len(order)], J[order], rtol=1e-6)
    assert (ids[:, 0] >= 0).sum() > 20  # most features have a neighbour: the test means something

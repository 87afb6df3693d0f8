"""Harvesting (several hooks in one pass), outlier exclusion, and TextActivationSource."""

import json

import numpy as np
import pytest
from test_data_stubs import TRACED_LAYERS, make_stub, stub_forward

from jsae.config import RunConfig
from jsae.data.harvest import Harvester, make_global_batch, norm_outlier_keep
from jsae.data.lm_source import TextActivationSource
from jsae.data.packing import pack_documents
from jsae.data.text import ListDocuments

WORDS = "the cat sat on a mat while dogs ran far away from home and never came back".split()


def corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 40))) + f" doc{i}" for i in range(n)]


def test_several_hooks_one_pass_equals_separate_passes():
    model = make_stub()
    toks, mask = pack_documents(corpus(8), lambda t: model.tokenizer.encode(t, False), 32, bos_id=2)
    toks, mask = toks[:4], mask[:4]
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.hook_resid_pre"]
    TRACED_LAYERS.clear()
    both = Harvester(model, hooks, forward=stub_forward)(toks, mask)
    assert TRACED_LAYERS == [3]  # stopped after layer 2, the last one needed (of 4)
    for h in hooks:
        one = Harvester(model, [h], forward=stub_forward)(toks, mask)
        np.testing.assert_array_equal(both[h], one[h])
        assert both[h].shape == (mask.sum(), 16) and both[h].dtype == np.float32
    acts = Harvester(model, hooks, forward=stub_forward).activations(toks)
    np.testing.assert_array_equal(both[hooks[0]], np.asarray(acts[hooks[0]])[mask])


def test_norm_outlier_exclusion():
    norms = {"a": np.array([1.0, 1.1, 0.9, 50.0, 1.0]), "b": np.array([1.0, 9.0, 1.0, 1.0, 1.0])}
    np.testing.assert_array_equal(norm_outlier_keep(norms, 5.0), [1, 0, 1, 0, 1])
    assert norm_outlier_keep(norms, None) is None
    model = make_stub()
    toks = np.array([[2, 5, 6, 7, 8, 9, 10, 11]] * 2)
    mask = np.ones_like(toks, bool)  # BOS kept on purpose: its activation is the outlier here
    h = "blocks.0.hook_resid_post"
    all_rows = Harvester(model, [h], forward=stub_forward)(toks, mask)[h]
    n = np.linalg.norm(all_rows, axis=-1)
    mult = float(np.sort(n / np.median(n))[-3]) - 1e-3  # drop the largest few
    n_keep = int((n <= mult * np.median(n)).sum())
    assert 0 < n_keep < len(n)
    kept = Harvester(model, [h], forward=stub_forward, exclude_norm_outliers=mult)(toks, mask)[h]
    assert len(kept) == n_keep
    assert np.linalg.norm(kept, axis=-1).max() <= mult * np.median(n) + 1e-6


def make_cfg(**data):
    cfg = RunConfig()
    cfg.model.hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    cfg.model.batch_size = 4
    cfg.data.source = "text"
    cfg.data.context_length = 16
    cfg.data.shuffle_buffer = 300
    cfg.data.holdout_fraction = 0.1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def source(cfg, docs, p=0, P=1):
    return TextActivationSource(
        cfg, make_stub(), p, P, documents=ListDocuments(docs), forward=stub_forward
    )


def test_text_source_batches_and_exact_resume():
    docs = corpus(60)
    cfg = make_cfg()
    a = source(cfg, docs)
    assert a.hooks == cfg.model.hooks and a.d_in == {h: 16 for h in cfg.model.hooks}
    first = [a.next_batch(50) for _ in range(7)]
    for b in first:
        assert set(b) == set(cfg.model.hooks)
        assert all(v.shape == (50, 16) and v.dtype == np.float32 for v in b.values())
    state = json.loads(json.dumps(a.state()))
    cont = [a.next_batch(50) for _ in range(40)]  # crosses into the next epoch
    b = source(cfg, docs)
    b.restore(state)
    assert b.state() == state
    for x, y in zip(cont, [b.next_batch(50) for _ in range(40)]):
        for h in cfg.model.hooks:
            np.testing.assert_array_equal(x[h], y[h])
    # a different seed gives a different stream
    cfg2 = make_cfg()
    cfg2.seed = 1
    c = source(cfg2, docs)
    assert not np.array_equal(c.next_batch(50)[cfg.model.hooks[0]], first[0][cfg.model.hooks[0]])
    with pytest.raises(ValueError, match="context_length"):
        source(make_cfg(context_length=32), docs).restore(state)


def test_text_source_eval_uses_holdout_only():
    docs = corpus(60)
    cfg = make_cfg()
    a = source(cfg, docs)
    ev = list(a.eval_batches(200, 64))
    assert [len(e[cfg.model.hooks[0]]) for e in ev] == [64, 64, 64, 8]
    again = list(source(cfg, docs).eval_batches(200, 64))
    np.testing.assert_array_equal(ev[0][cfg.model.hooks[1]], again[0][cfg.model.hooks[1]])
    # held-out rows come from held-out documents: with the holdout docs removed from the
    # corpus the eval rows change, while training on only the train docs does not
    from jsae.data.text import split_holdout

    train_ids, hold_ids = split_holdout(len(docs), cfg.data.holdout_fraction)
    assert len(hold_ids) == 6
    a_rows = a.next_batch(40)
    docs2 = list(docs)
    for i in hold_ids:
        docs2[i] = "zzzz " * 30  # replace only the held-out documents
    b = source(cfg, docs2)
    np.testing.assert_array_equal(b.next_batch(40)[cfg.model.hooks[0]], a_rows[cfg.model.hooks[0]])
    ev2 = list(b.eval_batches(200, 64))
    assert not np.array_equal(ev2[0][cfg.model.hooks[0]], ev[0][cfg.model.hooks[0]])


def test_processes_read_disjoint_documents():
    docs = [f"w{i} " * 5 for i in range(40)]
    cfg = make_cfg(holdout_fraction=0.0)
    seen = []
    for p in range(3):
        s = source(cfg, docs, p, 3)
        n = len(s.stream.order(0))
        it = s.stream.iterate(0, 0)
        seen.append([next(it)[2] for _ in range(n)])  # epoch 0 of this process
    union = [t for share in seen for t in share]
    assert sorted(union) == sorted(docs)  # whole corpus, no document twice


def test_make_global_batch_single_process():
    import jax

    from jsae.parallel import make_mesh

    mesh = make_mesh()
    local = {"h": np.arange(24, dtype=np.float32).reshape(8, 3)}
    g = make_global_batch(local, mesh)
    assert isinstance(g["h"], jax.Array) and g["h"].shape == (8 * jax.process_count(), 3)
    np.testing.assert_array_equal(np.asarray(g["h"]), local["h"])


def test_text_source_without_holdout_evaluates_on_training_text():
    cfg = make_cfg(holdout_fraction=0.0)
    with pytest.warns(UserWarning, match="no held-out"):
        ev = list(source(cfg, corpus(20)).eval_batches(50, 64))
    assert len(ev) == 1 and len(ev[0][cfg.model.hooks[0]]) == 50


def test_harvest_data_parallel_over_devices_matches_one_device():
    import jax

    if jax.device_count() < 2:
        pytest.skip("needs several (simulated) devices")
    model = make_stub()
    toks, mask = pack_documents(
        corpus(12), lambda t: model.tokenizer.encode(t, False), 16, bos_id=2
    )
    toks, mask = toks[:6], mask[:6]  # 6 rows over 4 devices: padded to 8, padding dropped
    hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    one = Harvester(model, hooks, forward=stub_forward, devices=None)(toks, mask)
    par = Harvester(model, hooks, forward=stub_forward, devices=jax.devices()[:4])
    many = par(toks, mask)
    assert len(par.activations(toks)[hooks[0]].sharding.device_set) == 4
    for h in hooks:
        np.testing.assert_allclose(many[h], one[h], rtol=1e-5, atol=1e-5)
    assert Harvester(model, hooks, forward=stub_forward).devices is None  # CPU: one device

"""Activation cache: exact round trip, interrupted + resumed harvest, cached source."""

import json

import numpy as np
import pytest
from test_data_harvest import corpus, make_cfg
from test_data_stubs import make_stub, stub_forward

from jsae.data.cache import (
    CacheActivationSource,
    harvest_to_cache,
    load_shard,
    read_manifest,
    save_shard,
)
from jsae.data.lm_source import TextActivationSource
from jsae.data.text import ListDocuments

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


def test_shard_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    rows = {h: rng.standard_normal((37, 16)).astype(np.float32) for h in HOOKS}
    save_shard(tmp_path / "s.safetensors", rows)
    back = load_shard(tmp_path / "s.safetensors")
    for h in HOOKS:
        np.testing.assert_array_equal(back[h], rows[h])
    save_shard(tmp_path / "b.safetensors", rows, "bfloat16")
    import ml_dtypes

    bf = load_shard(tmp_path / "b.safetensors", [HOOKS[0]])[HOOKS[0]]
    np.testing.assert_array_equal(bf, rows[HOOKS[0]].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files renamed away


def harvest(out, docs, **kw):
    return harvest_to_cache(
        make_cfg(),
        out,
        n_tokens=750,
        model=make_stub(),
        shard_rows=100,
        eval_tokens=130,
        progress=False,
        documents=ListDocuments(docs),
        forward=stub_forward,
        **kw,
    )


def shard_bytes(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}


def test_cache_holds_exactly_the_source_stream(tmp_path):
    docs = corpus(60)
    man = harvest(tmp_path / "c", docs)
    assert man["tokens"] == 750 and man["splits"]["train"]["complete"]
    assert [s["rows"] for s in man["splits"]["train"]["shards"]] == [100] * 7 + [50]
    assert man["splits"]["eval"]["rows"] == 130
    assert man["hooks"] == HOOKS and man["d_in"] == {h: 16 for h in HOOKS}
    assert man["context_length"] == 16 and man["source"]["dataset"] == "offline"
    # the shards hold exactly what the text source yields, in order
    src = TextActivationSource(
        make_cfg(), make_stub(), documents=ListDocuments(docs), forward=stub_forward
    )
    for s in man["splits"]["train"]["shards"]:
        want = src.next_batch(s["rows"])
        got = load_shard(tmp_path / "c" / s["file"])
        for h in HOOKS:
            np.testing.assert_array_equal(got[h], want[h])
    ev = np.concatenate(
        [load_shard(tmp_path / "c" / s["file"])[HOOKS[0]] for s in man["splits"]["eval"]["shards"]]
    )
    want_ev = np.concatenate([b[HOOKS[0]] for b in src.eval_batches(130, 64)])
    np.testing.assert_array_equal(ev, want_ev)
    # normalisation statistics of the training rows
    allrows = np.concatenate(
        [load_shard(tmp_path / "c" / s["file"])[HOOKS[1]] for s in man["splits"]["train"]["shards"]]
    )
    st = man["stats"][HOOKS[1]]
    assert st["count"] == 750
    np.testing.assert_allclose(
        st["mean_sq_norm"],
        (np.linalg.norm(allrows.astype(np.float64), axis=1) ** 2).mean(),
        rtol=1e-9,
    )
    np.testing.assert_allclose(st["norm_scale"], np.sqrt(16 / st["mean_sq_norm"]))
    np.testing.assert_allclose(st["mean"], allrows.mean(0), rtol=1e-5, atol=1e-6)


def test_interrupted_harvest_resumes_to_identical_cache(tmp_path):
    docs = corpus(60)
    harvest(tmp_path / "full", docs)

    class Crash(Exception):
        pass

    def crash_after_3(w):
        if len(w.split("train")["shards"]) == 3:
            raise Crash

    with pytest.raises(Crash):
        harvest(tmp_path / "part", docs, on_shard=crash_after_3)
    man = read_manifest(tmp_path / "part")
    assert man["tokens"] == 300 and not man["splits"]["train"]["complete"]
    # debris of a crash in the middle of the next shard: a temp file, and a renamed shard
    # whose manifest update never happened
    (tmp_path / "part/train/.shard-000003.safetensors.tmp-dead").write_bytes(b"partial")
    (tmp_path / "part/train/shard-000003.safetensors").write_bytes(b"garbage")
    man2 = harvest(tmp_path / "part", docs)
    assert man2["tokens"] == 750
    assert shard_bytes(tmp_path / "part") == shard_bytes(tmp_path / "full")
    full = read_manifest(tmp_path / "full")
    assert man2["stats"] == full["stats"]
    # asking for more tokens extends the cache; different settings are refused
    with pytest.raises(ValueError, match="different settings"):
        harvest_to_cache(
            make_cfg(context_length=32),
            tmp_path / "full",
            10,
            model=make_stub(),
            shard_rows=100,
            eval_tokens=130,
            progress=False,
            documents=ListDocuments(docs),
            forward=stub_forward,
        )


def cache_cfg(path, **kw):
    cfg = make_cfg(source="cache", path=str(path), shuffle_buffer=200, **kw)
    return cfg


def test_cache_source_reads_all_rows_and_resumes(tmp_path):
    docs = corpus(60)
    man = harvest(tmp_path / "c", docs)
    cfg = cache_cfg(tmp_path / "c")
    from jsae.data import make_source

    src = make_source(cfg)
    assert isinstance(src, CacheActivationSource)
    assert src.hooks == HOOKS and src.d_in == {h: 16 for h in HOOKS}
    allrows = np.concatenate(
        [load_shard(tmp_path / "c" / s["file"])[HOOKS[0]] for s in man["splits"]["train"]["shards"]]
    )
    base = {}
    for r in allrows:  # multiset (identical prefixes give identical rows)
        base[r.tobytes()] = base.get(r.tobytes(), 0) + 1
    keys = set(base)
    got = [src.next_batch(50) for _ in range(15)]  # exactly one epoch's worth is still mixed
    seen = np.concatenate([g[HOOKS[0]] for g in got])
    assert all(r.tobytes() in keys for r in seen)  # every row read is a cached row
    state = json.loads(json.dumps(src.state()))
    cont = [src.next_batch(50) for _ in range(30)]  # crosses the epoch boundary
    counts = {}
    for r in np.concatenate([seen] + [g[HOOKS[0]] for g in cont]):
        counts[r.tobytes()] = counts.get(r.tobytes(), 0) + 1
    # 2250 rows = 3 epochs (+ the mixer lag of < 1 epoch): every row seen, none over 4 times
    assert set(counts) == keys and all(c <= 4 * base[k] for k, c in counts.items())
    src2 = CacheActivationSource(cfg)
    src2.restore(state)
    for a in cont:
        b = src2.next_batch(50)
        for h in HOOKS:
            np.testing.assert_array_equal(a[h], b[h])
    ev = list(src.eval_batches(100, 32))
    assert [len(e[HOOKS[0]]) for e in ev] == [32, 32, 32, 4]
    ev_all = np.concatenate(
        [load_shard(tmp_path / "c" / s["file"])[HOOKS[0]] for s in man["splits"]["eval"]["shards"]]
    )
    np.testing.assert_array_equal(np.concatenate([e[HOOKS[0]] for e in ev]), ev_all[:100])
    with pytest.raises(ValueError, match="not in the cache"):
        CacheActivationSource(_bad_hooks(tmp_path / "c"))


def _bad_hooks(path):
    cfg = cache_cfg(path)
    cfg.model.hooks = ["blocks.0.hook_mlp_out"]
    return cfg


@pytest.mark.parametrize("P", [2, 3])
def test_cache_process_shares(tmp_path, P):
    docs = corpus(60)
    harvest(tmp_path / "c", docs)
    cfg = cache_cfg(tmp_path / "c")
    shares = [CacheActivationSource(cfg, p, P)._order(0) for p in range(P)]
    union = [i for s in shares for i in s]
    assert sorted(union) == list(range(8))  # every shard once, no overlap
    for e in range(2):
        assert sorted(
            i for p in range(P) for i in CacheActivationSource(cfg, p, P)._order(e)
        ) == list(range(8))
    evs = [
        np.concatenate(
            [b[HOOKS[0]] for b in CacheActivationSource(cfg, p, P).eval_batches(10**6, 64)]
        )
        for p in range(P)
    ]
    assert sum(len(e) for e in evs) == 130
    ev_all = np.concatenate(
        [b[HOOKS[0]] for b in CacheActivationSource(cfg).eval_batches(10**6, 64)]
    )
    np.testing.assert_array_equal(np.sort(np.concatenate(evs), axis=0), np.sort(ev_all, axis=0))


def test_cache_written_by_several_processes(tmp_path):
    docs = corpus(60)
    out = tmp_path / "c"
    for p in range(2):  # two hosts harvesting into one directory
        harvest(out, docs, process_index=p, process_count=2)
        if p == 0:
            with pytest.raises(ValueError, match="missing"):
                read_manifest(out)
    man = read_manifest(out)
    assert man["tokens"] == 750 and man["splits"]["train"]["complete"]
    assert man["splits"]["eval"]["rows"] == 130
    files = [s["file"] for s in man["splits"]["train"]["shards"]]
    assert len(files) == len(set(files)) == 8 and files[0].startswith("train/p00000-")
    rows = np.concatenate([load_shard(out / f)[HOOKS[0]] for f in files])
    assert len(rows) == 750
    st = man["stats"][HOOKS[0]]
    assert st["count"] == 750
    np.testing.assert_allclose(
        st["mean_sq_norm"], (np.linalg.norm(rows.astype(np.float64), axis=1) ** 2).mean()
    )
    # each process harvested its own documents: the two halves differ from a 1-process cache
    src = CacheActivationSource(cache_cfg(out), 1, 2)
    assert src.next_batch(100)[HOOKS[1]].shape == (100, 16)


def test_a_cache_trained_run_is_evaluated_on_the_cache_s_text(tmp_path):
    """`jsae eval` of a run trained from a cache reads text from the source the manifest
    records, not from data.path (which names the cache)."""
    import dataclasses

    from jsae.evals.evaluate import text_source

    cfg = make_cfg(dataset="files", path=str(tmp_path / "texts" / "*.jsonl"), text_field="body")
    harvest_to_cache(cfg, tmp_path / "c", n_tokens=200, model=make_stub(), eval_tokens=50,
                     progress=False, documents=ListDocuments(corpus(40)), forward=stub_forward)
    data = dataclasses.replace(cfg.data, source="cache", path=str(tmp_path / "c"),
                               dataset="other", text_field="text")
    text = text_source(data)
    assert text.source == "text" and text.path == str(tmp_path / "texts" / "*.jsonl")
    assert text.dataset == "files" and text.text_field == "body"
    assert text_source(cfg.data) is cfg.data  # a text run reads its own section

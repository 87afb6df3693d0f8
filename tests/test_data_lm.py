"""The data pipeline on the real jsae.models forward: a tiny random Llama, and (slow) Gemma 3 270M."""

import json

import numpy as np
import pytest

M = pytest.importorskip("jsae.models")

from test_data_harvest import corpus, make_cfg  # noqa: E402
from test_data_stubs import StubTokenizer  # noqa: E402

from jsae.data.harvest import Harvester  # noqa: E402
from jsae.data.lm_source import TextActivationSource  # noqa: E402
from jsae.data.packing import pack_documents  # noqa: E402
from jsae.data.text import ListDocuments  # noqa: E402


class TinyLM:
    def __init__(self, cfg, params, tokenizer, name="tiny-llama"):
        self.cfg, self.params, self.tokenizer, self.name = cfg, params, tokenizer, name


def tiny_llama(seed=0):
    from jsae.models.convert import params_from_hf, to_device

    D, H, K, Dh, F, V, L = 32, 4, 2, 8, 64, 300, 4
    cfg = M.TransformerConfig(
        arch="llama",
        vocab_size=V,
        d_model=D,
        n_layers=L,
        n_heads=H,
        n_kv_heads=K,
        head_dim=Dh,
        d_mlp=F,
        bos_id=2,
        eos_id=1,
        pad_id=0,
    )
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "model.norm.weight": np.ones(D)}
    for i in range(L):
        b = f"model.layers.{i}."
        t |= {
            b + "self_attn.q_proj.weight": rng.standard_normal((H * Dh, D)) / np.sqrt(D),
            b + "self_attn.k_proj.weight": rng.standard_normal((K * Dh, D)) / np.sqrt(D),
            b + "self_attn.v_proj.weight": rng.standard_normal((K * Dh, D)) / np.sqrt(D),
            b + "self_attn.o_proj.weight": rng.standard_normal((D, H * Dh)) / np.sqrt(H * Dh),
            b + "mlp.gate_proj.weight": rng.standard_normal((F, D)) / np.sqrt(D),
            b + "mlp.up_proj.weight": rng.standard_normal((F, D)) / np.sqrt(D),
            b + "mlp.down_proj.weight": rng.standard_normal((D, F)) / np.sqrt(F),
            b + "input_layernorm.weight": np.ones(D),
            b + "post_attention_layernorm.weight": np.ones(D),
        }
    t = {k: v.astype(np.float32) for k, v in t.items()}
    params = to_device(params_from_hf(cfg, t), "float32")
    return TinyLM(cfg, params, StubTokenizer())


HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.1.hook_resid_pre"]


def test_one_pass_several_hooks_equals_separate_passes_real_forward():
    lm = tiny_llama()
    toks, mask = pack_documents(corpus(10), lambda s: lm.tokenizer.encode(s, False), 24, bos_id=2)
    toks, mask = toks[:4], mask[:4]
    together = Harvester(lm, HOOKS)(toks, mask)
    full = M.forward(lm.cfg, lm.params, toks, capture=HOOKS)  # no early stop, logits too
    assert full.logits is not None
    for h in HOOKS:
        alone = Harvester(lm, [h])(toks, mask)[h]
        np.testing.assert_allclose(together[h], alone, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            together[h], np.asarray(full.activations[h])[mask], rtol=1e-5, atol=1e-5
        )
        assert together[h].shape == (mask.sum(), 32)
    assert mask.sum() < mask.size and not mask[:, 0].any()  # BOS positions dropped
    import jax

    if jax.device_count() >= 3:  # data parallel over devices (3 devices: 4 rows padded to 6)
        par = Harvester(lm, HOOKS, devices=jax.devices()[:3])(toks, mask)
        for h in HOOKS:
            np.testing.assert_allclose(par[h], together[h], rtol=1e-5, atol=1e-5)


def test_text_source_on_real_forward_resumes_exactly():
    lm = tiny_llama()
    cfg = make_cfg()
    cfg.model.hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    docs = ListDocuments(corpus(50))
    a = TextActivationSource(cfg, lm, documents=docs)
    [a.next_batch(64) for _ in range(5)]
    st = json.loads(json.dumps(a.state()))
    want = [a.next_batch(64) for _ in range(12)]
    b = TextActivationSource(cfg, lm, documents=docs)
    b.restore(st)
    for w in want:
        g = b.next_batch(64)
        for h in cfg.model.hooks:
            np.testing.assert_array_equal(w[h], g[h])


@pytest.mark.slow
def test_gemma_270m_offline_corpus_harvest(tmp_path):
    """Real model, real text: harvest two hooks from the offline corpus into a cache."""
    try:
        lm = M.load("gemma-3-270m")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"gemma-3-270m not available: {e}")
    from jsae.data.cache import CacheActivationSource, harvest_to_cache

    cfg = make_cfg(dataset="offline", context_length=64, shuffle_buffer=1024)
    cfg.model.hooks = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
    cfg.model.batch_size = 4
    man = harvest_to_cache(
        cfg, tmp_path / "c", 1024, model=lm, shard_rows=512, eval_tokens=256, progress=False
    )
    assert man["tokens"] == 1024 and man["d_in"] == {h: 640 for h in cfg.model.hooks}
    st = man["stats"]["blocks.6.hook_resid_post"]
    assert np.isfinite(st["mean_sq_norm"]) and st["mean_norm"] > 0
    cfg.data.source, cfg.data.path = "cache", str(tmp_path / "c")
    src = CacheActivationSource(cfg)
    b = src.next_batch(300)
    x = b["blocks.6.hook_resid_post"]
    assert x.shape == (300, 640) and np.isfinite(x).all()
    n = np.linalg.norm(x, axis=1)
    assert n.max() < 20 * np.median(n)  # BOS (attention-sink) rows were excluded


@pytest.mark.slow  # ~15 s of CPU: two trainer compilations
def test_training_from_text_resumes_bitwise_after_crash(tmp_path, monkeypatch):
    """Checkpointed training on the text source: crash, resume, end where the uninterrupted
    run ends (SAE, optimizer state and data position)."""
    import jax

    from jsae.config import from_dict
    from jsae.train.checkpoint import RunCheckpointer
    from jsae.train.loop import Trainer

    lm = tiny_llama()
    docs = ListDocuments(corpus(80))

    def cfg(run_dir):
        return from_dict(
            {
                "run_dir": str(run_dir),
                "model": {"hooks": ["blocks.2.hook_resid_post"], "batch_size": 4},
                "data": {"source": "text", "context_length": 16, "shuffle_buffer": 256},
                "sae": {"architecture": "topk", "d_sae": 64, "k": 4, "init_sample": 64},
                "train": {
                    "steps": 10,
                    "batch_size": 32,
                    "lr_warmup_steps": 2,
                    "log_every": 5,
                    "progress": False,
                },
                "checkpoint": {"every_steps": 3, "keep": 2},
                "eval": {"tokens": 64},
            }
        )

    class Crash(Exception):
        pass

    def run(c, crash_at=None):
        tr = Trainer(c, TextActivationSource(c, lm, documents=docs))
        ck = RunCheckpointer(c, tr, install_signal_handler=False, log_fn=lambda *_: None)
        if crash_at:
            orig, n = tr.step, [0]

            def step(states, batch):
                n[0] += 1
                if n[0] == crash_at:
                    raise Crash
                return orig(states, batch)

            tr.step = step
        try:
            tr.fit(checkpointer=ck, log=lambda *_: None)
        finally:
            ck.close()
        return tr

    ref = run(cfg(tmp_path / "ref"))
    with pytest.raises(Crash):
        run(cfg(tmp_path / "b"), crash_at=8)  # last checkpoint: step 6
    resumed = run(cfg(tmp_path / "b"))
    a = jax.tree_util.tree_leaves(jax.device_get(ref.states))
    b = jax.tree_util.tree_leaves(jax.device_get(resumed.states))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed.source.state() == ref.source.state()


@pytest.mark.slow
def test_jsae_harvest_command(tmp_path, capsys):
    try:
        M.load("gemma-3-270m")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"gemma-3-270m not available: {e}")
    from jsae.cli import main
    from jsae.data.cache import read_manifest

    cfg = tmp_path / "h.yaml"
    cfg.write_text(
        "model: {hooks: [blocks.2.hook_resid_post], batch_size: 4}\n"
        "data: {source: text, dataset: offline, context_length: 32, shuffle_buffer: 512}\n"
        "sae: {expansion: 2}\ntrain: {tokens: 100000}\n"
    )
    out = tmp_path / "cache"
    args = [
        "harvest",
        str(cfg),
        "--out",
        str(out),
        "--tokens",
        "300",
        "--eval-tokens",
        "100",
        "--shard-rows",
        "128",
        "--no-progress",
    ]
    assert main(args) == 0
    man = read_manifest(out)
    assert man["tokens"] == 300 and [s["rows"] for s in man["splits"]["train"]["shards"]] == [
        128,
        128,
        44,
    ]
    assert "300 training + 100 held-out tokens" in capsys.readouterr().out
    assert main(args[:5] + ["600"] + args[6:]) == 0  # asking for more extends the cache
    assert read_manifest(out)["tokens"] == 600

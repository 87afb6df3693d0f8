"""`jsae plan`: per-device bytes equal the compiled step's memory analysis."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import yaml

from jsae import config, parallel
from jsae.commands.plan import parse_bytes
from jsae.data import make_source
from jsae.plan import largest_d_sae, parse_mesh, plan
from jsae.train.loop import Trainer

RAW = {
    "data": {"source": "synthetic", "d_in": 16, "n_features": 64},
    "sae": {"d_sae": 128, "k": 4, "init_sample": 256},
    "train": {"steps": 10, "batch_size": 64},
}


def _cfg(**sae):
    raw = {**RAW, "sae": {**RAW["sae"], **sae}}
    return config.from_dict(raw)


@pytest.mark.parametrize("fast", [True, False])
def test_plan_matches_memory_analysis_of_the_real_step(fast):
    cfg = _cfg(fast_path=fast)
    p = plan(cfg, 1, 1)
    # independent: real states from a real source, the Trainer's step jitted by hand
    tr = Trainer(cfg, make_source(cfg), mesh=parallel.make_mesh(1, 1, jax.devices()[:1]))
    states = tr.init_states()
    sh = tr.state_shardings(states)
    batches = {h: parallel.global_batch(tr.source.next_batch(64)[h], tr.mesh) for h in tr.hooks}
    mem = jax.jit(
        tr._multi_step, in_shardings=(sh, {h: parallel.batch_sharding(tr.mesh) for h in tr.hooks}),
        out_shardings=(sh, parallel.replicated(tr.mesh)), donate_argnums=(0,),
    ).lower(states, batches).compile().memory_analysis()
    assert p.argument == mem.argument_size_in_bytes
    assert p.output == mem.output_size_in_bytes
    assert p.alias == mem.alias_size_in_bytes
    assert p.temp == mem.temp_size_in_bytes
    assert p.peak == p.argument + p.output - p.alias + p.temp
    (h,) = tr.hooks
    assert p.params == sum(x.nbytes for x in jax.tree.leaves(states[h].sae))
    assert p.opt_state == sum(x.nbytes for x in jax.tree.leaves(states[h].opt_state))
    assert p.batch == 64 * 16 * 4
    assert p.params + p.opt_state + p.other_state + p.batch == p.argument
    # W_enc, W_dec, b_enc, b_dec, norm_scale in float32
    assert p.params == 4 * (2 * 16 * 128 + 128 + 16 + 1)
    assert p.temp > 64 * 128 * 4  # at least the pre-activations [B, d_sae]


def test_sharded_plan_divides_latents_and_batch(tmp_path):
    """2x2 simulated mesh: per-device bytes follow the partition specs, and match XLA."""
    code = textwrap.dedent(f"""
        import json, jax
        from jsae import config
        from jsae.plan import ensure_devices, plan, compile_step
        assert ensure_devices(4)
        cfg = config.from_dict({RAW!r})
        p = plan(cfg, 2, 2)
        mem = compile_step(cfg, 2, 2)[0].memory_analysis()
        raw = {RAW!r}
        raw["sae"] = {{**raw["sae"], "d_sae": 8192, "fast_path": False}}
        big = config.from_dict(raw)
        temps = [plan(big, 1, m).temp for m in (1, 4)]
        print(json.dumps({{**p.as_dict(), "xla_temp": mem.temp_size_in_bytes,
                          "xla_arg": mem.argument_size_in_bytes, "temps": temps}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout.strip().splitlines()[-1])
    assert (p["data"], p["model"], p["simulated"]) == (2, 2, True)
    assert p["params"] == 4 * ((2 * 16 * 128 + 128) // 2 + 16 + 1)  # latents split over model
    assert p["batch"] == 64 * 16 * 4 // 2  # rows split over data
    assert p["argument"] == p["xla_arg"] == p["params"] + p["opt_state"] + p["other_state"] + p[
        "batch"]
    assert p["temp"] == p["xla_temp"]
    # latent sharding must shrink activations: no [B, d_sae] array may be gathered whole
    # (the reference AuxK top-k over model-sharded pre-activations used to do that)
    t1, t4 = p["temps"]
    assert t4 < 0.5 * t1, (t1, t4)


def test_largest_d_sae_solves_the_budget():
    cfg = _cfg()
    target = plan(_cfg(d_sae=2048), 1, 1)
    best, p0, p1 = largest_d_sae(cfg, target.peak, probes=(512, 1024))
    assert p0.d_sae == {h: 512 for h in p0.d_sae} and p1.peak > p0.peak
    assert abs(best - 2048) <= 256, best
    assert best % 256 == 0


def test_parse_helpers():
    assert parse_mesh("data=4,model=8") == (4, 8)
    assert parse_mesh("model=2") == (1, 2)
    with pytest.raises(ValueError):
        parse_mesh("data=0")
    with pytest.raises(ValueError):
        parse_mesh("pipeline=2")
    assert parse_bytes("80GB") == 80e9
    assert parse_bytes("16GiB") == 16 * 1024**3
    assert parse_bytes("7.5e10") == 7.5e10


def test_cli_plan_prints_json(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(RAW))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run(
        [sys.executable, "-m", "jsae", "plan", str(path), "--mesh", "data=2,model=2", "--json",
         "--set", "sae.d_sae=256"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])["plan"]
    assert (out["data"], out["model"]) == (2, 2)
    assert list(out["d_sae"].values()) == [256]
    assert out["params"] == 4 * ((2 * 16 * 256 + 256) // 2 + 16 + 1)
    assert out["peak"] >= out["argument"]
    assert math.isclose(out["batch"], 64 * 16 * 4 / 2)
    assert np.isfinite(out["temp"])


def test_d_in_of_known_models_and_caches_without_loading(tmp_path):
    from jsae.plan import resolve_d_in

    pod = config.load("configs/tpu_pod_16m.yaml")  # a gs:// cache of Gemma 3 1B
    assert resolve_d_in(pod) == 1152
    for name, width in [("google/gemma-3-12b-pt", 3840), ("gemma-3-270m", 640),
                        ("openai-community/gpt2-medium", 1024), ("gpt2", 768),
                        ("google/gemma-2-27b", 4608)]:
        cfg = config.from_dict({"model": {"name": name}, "data": {"source": "text"},
                                "sae": {"expansion": 8}, "train": {"steps": 1}})
        assert resolve_d_in(cfg) == width, name
    cfg = config.from_dict({"model": {"name": "my/own-model"}, "data": {"source": "text"},
                            "sae": {"expansion": 8}, "train": {"steps": 1}})
    with pytest.raises(ValueError, match="--d-in"):
        resolve_d_in(cfg)


def test_d_in_read_from_a_local_activation_cache(tmp_path):
    from jsae.data.cache import CacheWriter, cache_meta
    from jsae.plan import resolve_d_in

    raw = {"model": {"name": "my/own-model", "hooks": ["blocks.2.hook_resid_post"]},
           "data": {"source": "cache", "path": str(tmp_path / "acts")},
           "sae": {"expansion": 8}, "train": {"steps": 1}}
    cfg = config.from_dict(raw)
    with pytest.raises(ValueError, match="--d-in"):  # not harvested yet, unknown model
        resolve_d_in(cfg)
    w = CacheWriter(tmp_path / "acts", cache_meta(cfg, "my/own-model",
                                                  {"blocks.2.hook_resid_post": 96}, 64))
    w.write_shard("train", {"blocks.2.hook_resid_post": np.ones((4, 96), np.float32)})
    assert resolve_d_in(cfg) == 96


def test_a_multi_hook_dictionary_plans_with_one_batch_per_hook():
    """The step reads one [B, d_in] batch per harvested hook (it stacks a crosscoder's); the
    table lists the architecture's tensors with their per-hook shapes."""
    cfg = config.from_dict({
        "data": {"source": "synthetic", "d_in": 16}, "model": {"hooks": ["a", "b", "c"]},
        "sae": {"architecture": "crosscoder", "d_sae": 64},
        "train": {"steps": 1, "batch_size": 32}})
    p = plan(cfg, 1, 1)
    assert p.batch == 3 * 32 * 16 * 4
    assert p.tensors["a+b+c"]["W_dec"] == {"shape": [64, 3, 16], "bytes": 64 * 3 * 16 * 4,
                                           "per_device": 64 * 3 * 16 * 4}
    assert p.params == 4 * (2 * 3 * 16 * 64 + 64 + 3 * 16) + 4  # + norm_scale
    assert "W_dec         [64, 3, 16]" in p.table()

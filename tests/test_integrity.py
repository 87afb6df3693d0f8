"""Integrity of the files jsae writes and reads again: truncated and bit-flipped SAE folders,
activation-cache shards and model-cache entries are found on open, named, and either rebuilt
(the model cache) or replaced by the fallback the message names (a run's last checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jsae.cli import main
from jsae.errors import FileFormatError
from jsae.sae.core import SAESpec
from jsae.sae.init import init_sae
from jsae.sae.io import load_sae, save_sae

CFG = """\
seed: 0
data: {source: synthetic, d_in: 16, n_features: 64, active_per_sample: 2}
sae: {architecture: topk, d_sae: 64, k: 2, init_sample: 256}
train: {steps: 10, batch_size: 128, lr: 3.0e-3, lr_warmup_steps: 2, log_every: 5,
        progress: false}
checkpoint: {every_steps: 10}
eval: {tokens: 256}
mesh: {data: 1}
"""


def truncate(f: Path, keep: float = 0.6) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def flip(f: Path, at: float = 0.7) -> None:
    data = bytearray(f.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    f.write_bytes(bytes(data))


def _sae():
    spec = SAESpec("topk", d_in=8, d_sae=32, k=2)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    return init_sae(jax.random.key(0), spec, x)


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "bit-flip"])
def test_damaged_sae_folder_is_named(tmp_path, damage):
    folder = save_sae(_sae(), tmp_path / "run" / "saes" / "h")
    info = json.loads((folder / "sae.json").read_text())
    assert info["files"]["sae.safetensors"]["bytes"] == (folder / "sae.safetensors").stat().st_size
    load_sae(folder)  # intact: loads
    damage(folder / "sae.safetensors")
    with pytest.raises(FileFormatError) as e:
        load_sae(folder)
    msg = str(e.value)
    assert str(folder / "sae.safetensors") in msg and "damaged" in msg
    assert "no checkpoint" in msg  # this run has none: the message says what is left


def test_damaged_final_sae_falls_back_to_the_checkpoint(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CFG)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    weights = run / "saes" / "synthetic" / "sae.safetensors"
    good = load_sae(weights.parent)[0]
    truncate(weights)
    with pytest.raises(FileFormatError, match="checkpoint.*step 10"):
        load_sae(weights.parent)
    # export and eval's loader use the last checkpoint (same weights), saying so.
    from jsae.evals.evaluate import load_run_saes
    from jsae.export.run import sae_from_run

    sae, meta = sae_from_run(run)
    assert meta["step"] == 10 and "checkpoints" in meta["from"]
    assert "damaged" in capsys.readouterr().err
    for k in good.params:
        np.testing.assert_array_equal(np.asarray(sae.params[k]), np.asarray(good.params[k]))
    assert set(load_run_saes(run)) == {"synthetic"}
    rc = main(["export", str(run), "--format", "saelens", str(tmp_path / "out")])
    assert rc == 0 and (tmp_path / "out" / "cfg.json").exists()


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "bit-flip"])
def test_damaged_cache_shard_is_named(tmp_path, damage):
    from jsae.data.cache import DamagedShardError, load_shard, save_shard

    f = tmp_path / "cache" / "train" / "shard-000000.safetensors"
    rows = {"h": np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)}
    check = save_shard(f, rows)
    np.testing.assert_array_equal(load_shard(f, expect=check)["h"], rows["h"])
    damage(f)
    with pytest.raises(DamagedShardError) as e:
        load_shard(f, expect=check)
    assert str(f) in str(e.value) and "jsae harvest" in str(e.value)
    if damage is truncate:  # without the manifest's record, the layout still tells
        with pytest.raises(DamagedShardError, match="ends at byte"):
            load_shard(f)


def test_cache_source_checks_shards(tmp_path):
    """A cache written by the harvester records size and checksum; the source checks them."""
    from types import SimpleNamespace

    from jsae.data.cache import CacheActivationSource, CacheWriter, DamagedShardError

    w = CacheWriter(tmp_path / "c", {"model": "m", "hooks": ["h"], "d_in": {"h": 8},
                                    "dtype": "float32"})
    rng = np.random.default_rng(0)
    for split in ("train", "train", "eval"):
        w.write_shard(split, {"h": rng.normal(size=(64, 8)).astype(np.float32)})
    w.mark_complete("train")
    w.mark_complete("eval")
    man = json.loads((tmp_path / "c" / w.name).read_text())
    assert all("sha256" in s for s in man["splits"]["train"]["shards"])
    cfg = SimpleNamespace(data=SimpleNamespace(path=str(tmp_path / "c"), shuffle_buffer=64),
                          model=SimpleNamespace(hooks=["h"]), seed=0)
    assert len(next(CacheActivationSource(cfg).eval_batches(10, 10))["h"]) == 10
    flip(tmp_path / "c" / man["splits"]["eval"]["shards"][0]["file"])
    with pytest.raises(DamagedShardError, match="SHA-256"):
        next(CacheActivationSource(cfg).eval_batches(10, 10))
    # a harvest resuming over a truncated shard stops at once, naming it and --overwrite
    truncate(tmp_path / "c" / man["splits"]["train"]["shards"][1]["file"])
    with pytest.raises(DamagedShardError, match="shard-000001.*--overwrite"):
        CacheWriter(tmp_path / "c", {"model": "m", "hooks": ["h"], "d_in": {"h": 8},
                                     "dtype": "float32"})


def test_truncated_model_cache_entry_is_rebuilt(tmp_path, capsys):
    from safetensors.numpy import save_file

    from jsae.models import loading

    entry = tmp_path / "models" / "tiny-v1"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    save_file({"w": np.ones((64, 64), np.float32)}, str(entry / "params.safetensors"))
    assert loading._usable(entry)
    truncate(entry / "params.safetensors")
    assert "header says" in loading._entry_problem(entry)
    assert not loading._usable(entry)  # removed, to be converted again
    assert not entry.exists()
    err = capsys.readouterr().err
    assert "damaged" in err and str(entry) in err

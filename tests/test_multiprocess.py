"""A real two-process `jsae train --distributed` run (gloo over localhost, 4 CPU devices each)
equals one process on 8 devices fed the same global batches.

The SAE's arrays span both processes, so the final evaluation, the saved SAE and the
checkpoints all need the multi-host code paths (`jsae.parallel.to_host` and `global_batch`,
`ReconstructionStats.merge_processes`, Orbax on several processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "seed": 3,
    "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 3},
    "sae": {"architecture": "topk", "d_sae": 64, "k": 3, "init_sample": 64,
            "dead_after_tokens": 64},
    "train": {"steps": 6, "batch_size": 32, "lr": 1e-2, "lr_warmup_steps": 0, "log_every": 2,
              "progress": False},
    "eval": {"tokens": 256},
    "checkpoint": {"every_steps": 3},
    "mesh": {"data": 1, "model": 8},
}

# One process, 8 devices: a source that returns exactly what the two processes' sources
# together feed the global batch (process 0's rows, then process 1's).
EMULATE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    from jsae import config, parallel
    from jsae.data.sources import SyntheticSource
    from jsae.train.loop import Trainer

    cfg = config.load(sys.argv[1])
    srcs = [SyntheticSource(16, 64, 3, seed=cfg.seed, process_index=p, process_count=2)
            for p in range(2)]

    class Both:
        hooks, d_in, features = srcs[0].hooks, srcs[0].d_in, srcs[0].features
        def next_batch(self, n):
            parts = [s.next_batch(n // 2) for s in srcs]
            return {h: np.concatenate([p[h] for p in parts]) for h in self.hooks}
        def eval_batches(self, n_tokens, batch_size):  # both shares, side by side
            shares = [s.eval_batches(n_tokens // 2, batch_size // 2) for s in srcs]
            for parts in zip(*shares):
                yield {h: np.concatenate([p[h] for p in parts]) for h in self.hooks}

    tr = Trainer(cfg, Both(), mesh=parallel.make_mesh(cfg.mesh.data, cfg.mesh.model))
    st = tr.init_states()
    for _ in range(cfg.train.steps):
        st, _ = tr.step(st, tr.source.next_batch(cfg.train.batch_size))
    (h,) = tr.hooks
    np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in jax.device_get(st[h].sae.params).items()})
    print(json.dumps(tr.evaluate(st)[h]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(cfg_path: Path, run_dir: Path | list[Path], port: int, *extra: str
            ) -> list[subprocess.CompletedProcess]:
    """Run `jsae train --distributed` as processes 0 and 1 (run_dir: shared, or one each)."""
    dirs = run_dir if isinstance(run_dir, list) else [run_dir, run_dir]
    procs = []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jsae", "train", str(cfg_path), "--distributed",
             "--run-dir", str(dirs[pid]), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("data,model", [(1, 8), (2, 4)])
def test_two_process_run_equals_one_process(tmp_path, data, model):
    """(1, 8): every device needs every row (batches gathered from both processes) and the
    latents span both; (2, 4): each process feeds its own rows and holds all latents."""
    cfg_path = tmp_path / "mp.yaml"
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "mesh": {"data": data, "model": model}}))
    run_dir = tmp_path / "run"
    results = _launch(cfg_path, run_dir, _free_port())
    for r in results:
        assert r.returncode == 0, r.stderr[-4000:]
    # process 0 wrote the run's files; both report the held-out metrics of all shares
    summary = json.loads((run_dir / "summary.json").read_text())
    held = summary["heldout"]["synthetic"]
    assert held["tokens"] == 256
    for r in results:
        assert f"held-out: FVU {held['fvu']:.4f}" in r.stdout, r.stdout[-2000:]

    ref = subprocess.run(
        [sys.executable, "-c", EMULATE, str(cfg_path), str(tmp_path / "ref.npz")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""},
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_metrics = json.loads(ref.stdout.strip().splitlines()[-1])
    want = np.load(tmp_path / "ref.npz")

    from safetensors.numpy import load_file

    (sae_dir,) = (run_dir / "saes").iterdir()
    got = load_file(next(sae_dir.glob("*.safetensors")))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for key in ("fvu", "l0", "mse", "cos_sim", "dead_frac"):
        assert held[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6
    if data == 1:  # both processes resume from the multi-host checkpoint and go on
        again = _launch(cfg_path, run_dir, _free_port(), "--set", "train.steps=8")
        for r in again:
            assert r.returncode == 0, r.stderr[-4000:]
            assert "resuming from step 6" in r.stdout + r.stderr
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


MERGE = textwrap.dedent("""
    import json, os, sys
    import jax
    if os.environ.get("JAX_NUM_PROCESSES"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(num_processes=2, process_id=int(os.environ["JAX_PROCESS_ID"]))
    import numpy as np
    from jsae.evals.downstream import DownstreamStats
    from jsae.evals.reconstruction import ReconstructionStats
    from jsae.parallel import process_sum
    from jsae.sae import SAESpec, init_sae

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(96, 8)) * 3 + 100.0).astype(np.float32)  # large mean: needs Chan
    sae = init_sae(jax.random.key(0), SAESpec("topk", 8, 32, k=3), x)
    ce = rng.normal(size=(5, 7, 5)) ** 2  # [variants (clean + 4 for the hook), batch, T - 1]
    kl = rng.random((5, 7, 6))
    mask = rng.random((7, 6)) < 0.8
    pid, n = jax.process_index(), jax.process_count()
    rs, ds = ReconstructionStats(), DownstreamStats(["a"])
    rows = np.array_split(np.arange(96), 2)  # process p evaluates share p
    shares = [pid] if n == 2 else [0, 1]
    for p in shares:
        rs.add(sae, x[rows[p]])
        ds.add(ce[:, p::2], kl[:, p::2], mask[p::2])
    rs.merge_processes(8, 32)
    ds.merge_processes()
    out = {"recon": rs.result(), "down": ds.result()["a"],
           "sum": process_sum(np.array([1.0 + 1e-12, pid])).tolist()}
    if pid == 0:
        print("RESULT " + json.dumps(out))
""")


def test_statistics_merged_across_processes_equal_one_process():
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", MERGE],
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
             "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(pid)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = json.loads(outs[0][0].split("RESULT ", 1)[1])
    one = subprocess.run([sys.executable, "-c", MERGE], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO),
                                           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert one.returncode == 0, one.stderr[-3000:]
    want = json.loads(one.stdout.split("RESULT ", 1)[1])
    assert got["recon"]["tokens"] == want["recon"]["tokens"] == 96
    for part in ("recon", "down"):
        for key, v in want[part].items():
            assert got[part][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (part, key)
    assert got["sum"] == [2.0 + 2e-12, 1.0]  # float64 survives the float32 transport
    assert want["sum"] == [1.0 + 1e-12, 0.0]


def test_unshared_checkpoint_folder_fails_before_training(tmp_path):
    """Each host with its own local run_dir: an error at start naming the problem, instead of
    checkpoints that lose the other hosts' shards at the first save."""
    cfg_path = tmp_path / "mp.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    results = _launch(cfg_path, [tmp_path / "host0", tmp_path / "host1"], _free_port())
    for r in results:
        assert r.returncode != 0
        assert "is not shared by all hosts" in r.stderr, r.stderr[-3000:]
        assert "processes [1]" in r.stderr
    assert not (tmp_path / "host0" / "saes").exists()

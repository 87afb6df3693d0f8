"""benchmarks/sae_step.py runs end to end at a tiny shape and prints its summary line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

TINY = ["--batch", "64", "--d-in", "16", "--d-sae", "128", "--k", "4", "--rounds", "1",
        "--steps", "1"]


def _bench(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/sae_step.py", *TINY, *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sae_step_benchmark_on_a_simulated_mesh():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("XLA_FLAGS", None)  # the benchmark asks for its own simulated devices
    r = _bench("--peers", "--cpu-devices", "4", "--mesh", "data=2,model=2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh: data=2 model=2 (4 x cpu" in r.stdout, r.stdout
    for name in ("jsae-fast", "jsae-reference"):
        assert re.search(rf"^{name}\s+[\d.]+ ms/step", r.stdout, re.M), r.stdout

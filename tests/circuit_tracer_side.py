"""Running a script under the real circuit-tracer (a side venv in CI: $JSAE_CIRCUIT_TRACER_PYTHON,
built by tools/test.sh with JSAE_WITH_CIRCUIT_TRACER=1: it needs transformers<=4.57.3, which
the main environment's transformers 5 rules out)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def circuit_tracer_python() -> str:
    """$JSAE_CIRCUIT_TRACER_PYTHON, or this Python if it has circuit_tracer; else the test skips."""
    exe = os.environ.get("JSAE_CIRCUIT_TRACER_PYTHON")
    if not exe and importlib.util.find_spec("circuit_tracer"):
        exe = sys.executable
    if not exe:
        pytest.skip("circuit-tracer is not installed (set JSAE_CIRCUIT_TRACER_PYTHON to a Python "
                    "with it, as `JSAE_WITH_CIRCUIT_TRACER=1 bash tools/test.sh` does)")
    return exe


def run_circuit_tracer(script: str, root: Path):
    """Run ``script`` (argv[1] = ``root``) under circuit-tracer; its last stdout line as JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([circuit_tracer_python(), "-c", script, str(root)], capture_output=True,
                         text=True, timeout=600, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

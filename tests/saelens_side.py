"""Running a script under the real sae-lens (a side venv in CI: $JSAE_SAELENS_PYTHON)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def saelens_python() -> str:
    """$JSAE_SAELENS_PYTHON, or this Python if it has sae_lens; else the test skips."""
    exe = os.environ.get("JSAE_SAELENS_PYTHON")
    if not exe and importlib.util.find_spec("sae_lens"):
        exe = sys.executable
    if not exe:
        pytest.skip("sae_lens is not installed (set JSAE_SAELENS_PYTHON to a Python with it)")
    return exe


def run_saelens(script: str, root: Path):
    """Run ``script`` (argv[1] = ``root``) under sae-lens; its last stdout line, parsed as JSON."""
    out = subprocess.run([saelens_python(), "-c", script, str(root)], capture_output=True,
                         text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

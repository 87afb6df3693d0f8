"""Runs a notebook top to bottom in a fresh Jupyter kernel (used by test_notebooks*.py).

The notebooks are split over two test files so that pytest-xdist (`--dist loadfile`, as
tools/test.sh runs the suite) executes them on two workers at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# roughly equal halves of the notebooks' run time on 2 CPU cores
# balanced by the measured times of 2026-12-07 (first ~650 s, second ~790 s on the 2-core CI
# machine, before notebook 11's ~100 s joined the first)
FIRST_HALF = ("01_quickstart", "02_golden_gate", "04_tpu_and_pods", "07_multimodal",
              "09_circuits_transcoders", "11_scaling_and_families")


def half(first: bool) -> list[Path]:
    return [p for p in NOTEBOOKS if (p.stem in FIRST_HALF) == first]


def run_notebook(path: Path, workdir: Path) -> None:
    """Execute ``path`` with SMALL = True and ``JSAE_NOTEBOOK_CI=1`` in ``workdir``."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ["JSAE_NOTEBOOK_CI"] = "1"
    os.environ.setdefault("JSAE_REPO_ROOT", str(ROOT))
    # The kernel must not inherit pytest's 8 simulated devices unless a notebook asks for them.
    os.environ.pop("XLA_FLAGS", None)
    try:
        client = nbclient.NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}},
        )
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{path.name}: {str(e)[-3000:]}")
    finally:
        os.environ.clear()
        os.environ.update(env_before)

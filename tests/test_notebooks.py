"""Every notebook in notebooks/ runs top to bottom (SMALL = True, CPU) and is stored stripped.

Notebooks are executed with nbclient in a fresh Jupyter kernel of this Python, in a temporary
working directory, with ``JSAE_NOTEBOOK_CI=1`` set so a notebook may shorten itself further.
A cell error fails the test and names the cell.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), f"{path.name} cell {i} has outputs: strip them (tools/strip_notebooks.py)"
        assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
    src = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "SMALL = True" in src, f"{path.name}: the first cells must set SMALL = True"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path):
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
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
        )
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{path.name}: {str(e)[-3000:]}")
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert sys.executable  # ran in this interpreter's kernel (ipykernel's python3 spec)

"""Every notebook in notebooks/ runs top to bottom (SMALL = True, CPU) and is stored stripped.

Notebooks are executed with nbclient in a fresh Jupyter kernel of this Python, in a temporary
working directory, with ``JSAE_NOTEBOOK_CI=1`` set so a notebook may shorten itself further.
A cell error fails the test and names the cell.
"""

from __future__ import annotations

import json

import pytest
from notebook_runner import NOTEBOOKS, half, run_notebook


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
@pytest.mark.parametrize("path", half(True), ids=_ids(half(True)))
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path)

"""The second half of the notebooks, run top to bottom (see tests/notebook_runner.py)."""

import pytest
from notebook_runner import half, run_notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", half(False), ids=[p.stem for p in half(False)])
def test_notebook_runs(path, tmp_path):
    run_notebook(path, tmp_path)

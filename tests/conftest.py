"""Test setup: 8 simulated CPU devices (must be set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The longest test files first, so that under pytest-xdist (`-n 2 --dist loadfile`, as
# tools/test.sh runs the suite) they start at once on both workers instead of ending the run on one.
_LONGEST_FIRST = ("test_notebooks.py", "test_notebooks_2.py", "test_evals_gemma.py",
                  "test_atlas_real.py", "test_multiprocess.py", "test_languages_gemma.py",
                  "test_benchmarks.py", "test_nothing_lost.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept

"""One check for "a mesh trains what one device trains" (used by the architecture tests)."""

from __future__ import annotations

import numpy as np
import pytest

MESHES = ((8, 1), (2, 4))  # data-parallel, and latents split over `model`


def assert_meshes_match(train, meshes=MESHES, metric: str = "loss"):
    """``train(data, model) -> (state, metrics)`` (host arrays) on each mesh equals (1, 1):
    every SAE parameter and ``metrics[metric]``."""
    ref, ref_m = train(1, 1)
    for data, model in meshes:
        st, m = train(data, model)
        for name, v in ref.sae.params.items():
            np.testing.assert_allclose(st.sae.params[name], v, rtol=2e-4, atol=2e-5,
                                       err_msg=f"{name} mesh {data}x{model}")
        assert float(m[metric]) == pytest.approx(float(ref_m[metric]), rel=1e-4)
    return ref, ref_m

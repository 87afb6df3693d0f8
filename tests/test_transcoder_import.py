"""Transcoders in: SAELens folders (``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``)
round-trip through jsae's export, and Gemma Scope 2 transcoder folders (``w_enc``, ...,
``affine_skip_connection``) import with outputs equal to a NumPy formula; sae-lens itself reads
jsae's exports in tests/test_arch_transcoder.py."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_arch_transcoder import JUMP_ARCHS, _jump_sae

from jsae.export import load_gemmascope
from jsae.export.saelens import load_saelens, save_saelens
from jsae.sae import reconstruct


@pytest.mark.parametrize("arch", JUMP_ARCHS)
def test_saelens_transcoder_round_trip(tmp_path, arch):
    sae, x, _ = _jump_sae(arch)
    sae = sae.replace(norm_scale=jnp.asarray(0.4, jnp.float32))  # folded on export
    save_saelens(sae, tmp_path / "tc", hook_name="blocks.6.hook_resid_mid",
                 model_name="gemma-3-270m", metadata={"hook_name_out": "blocks.6.hook_mlp_out"})
    back, meta = load_saelens(tmp_path / "tc")
    assert back.spec.architecture == arch
    assert meta["hook_name"] == "blocks.6.hook_resid_mid"
    assert meta["hook_name_out"] == "blocks.6.hook_mlp_out"
    xs = jnp.asarray(3.0 * x)
    np.testing.assert_allclose(reconstruct(back, xs), reconstruct(sae, xs), rtol=1e-5, atol=1e-5)


def _gemmascope2_folder(root, *, skip: bool, seed=0, d=8, n=24):
    """A folder as Gemma Scope 2 ships a transcoder: params.safetensors + config.json."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t = {"w_enc": rng.standard_normal((d, n)), "w_dec": rng.standard_normal((n, d)),
         "b_enc": rng.standard_normal(n) * 0.1, "b_dec": rng.standard_normal(d),
         "threshold": np.abs(rng.standard_normal(n)) * 0.5}
    if skip:
        t["affine_skip_connection"] = rng.standard_normal((d, d)) * 0.3  # [d_in, d_out]
    t = {k: v.astype(np.float32) for k, v in t.items()}
    folder = root / "transcoder" / "layer_5_width_16k_l0_small"
    folder.mkdir(parents=True)
    save_file(t, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "affine_connection": skip,
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.input",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}))
    return folder, t


@pytest.mark.parametrize("skip", [False, True])
def test_gemmascope2_transcoder_matches_numpy(tmp_path, skip):
    folder, t = _gemmascope2_folder(tmp_path, skip=skip)
    sae, meta = load_gemmascope(folder)
    assert sae.spec.architecture == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
    assert meta["hook_name"] == "blocks.5.hook_resid_mid"
    assert meta["hook_name_out"] == "blocks.5.hook_mlp_out"
    x = np.random.default_rng(1).standard_normal((40, 8)) * 2
    pre = x @ t["w_enc"] + t["b_enc"]
    z = np.where(pre > t["threshold"], np.maximum(pre, 0), 0.0)
    want = z @ t["w_dec"] + t["b_dec"] + (x @ t["affine_skip_connection"] if skip else 0.0)
    assert 0 < np.mean(z != 0) < 1
    got = reconstruct(sae, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_gemmascope2_bad_skip_shape_is_one_clear_line(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = _gemmascope2_folder(tmp_path, skip=True)
    t = load_file(str(folder / "params.safetensors"))
    t["affine_skip_connection"] = np.zeros((8, 5), np.float32)
    save_file(t, str(folder / "params.safetensors"))
    with pytest.raises(ValueError, match=r"W_skip \[8, 8\].*of shape \(5, 8\)"):
        load_gemmascope(folder)

"""Export to SAELens / Gemma Scope and import back; checked against NumPy versions of the
formulas SAELens and Gemma Scope use, and against the real SAELens package when available."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from saelens_side import run_saelens, saelens_python
from safetensors.numpy import load_file, save_file

from jsae.cli import main as cli_main
from jsae.config import from_dict
from jsae.data import make_source
from jsae.export import (
    export_run,
    load_gemmascope,
    load_saelens,
    sae_from_run,
    save_gemmascope,
    save_saelens,
)
from jsae.sae import SAE, SAESpec, decode, encode, fold_norm
from jsae.train.checkpoint import RunCheckpointer
from jsae.train.loop import Trainer
from jsae.train.run import Run

REPO = Path(__file__).resolve().parents[1]
D_IN, D_SAE = 12, 48
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]


def _random_sae(arch: str, seed: int = 0) -> SAE:
    """An SAE with every parameter non-trivial (biases, thresholds, norm_scale != 1)."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((D_SAE, D_IN)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=-1, keepdims=True)
    p = {
        "W_enc": (w_dec.T + 0.1 * rng.standard_normal((D_IN, D_SAE))).astype(np.float32),
        "W_dec": w_dec,
        "b_enc": (0.1 * rng.standard_normal(D_SAE)).astype(np.float32),
        "b_dec": (0.5 * rng.standard_normal(D_IN)).astype(np.float32),
    }
    if arch == "jumprelu":
        p["log_threshold"] = np.log(rng.uniform(0.05, 0.6, D_SAE)).astype(np.float32)
    if arch == "batchtopk":
        p["threshold"] = rng.uniform(0.05, 0.6, D_SAE).astype(np.float32)
    if arch == "gated":
        p["r_mag"] = (0.2 * rng.standard_normal(D_SAE)).astype(np.float32)
        p["b_mag"] = (0.1 * rng.standard_normal(D_SAE)).astype(np.float32)
    spec = SAESpec(arch, D_IN, D_SAE, k=4 if arch in ("topk", "batchtopk") else None)
    return SAE(params={k: jnp.asarray(v) for k, v in p.items()},
               norm_scale=jnp.asarray(0.37, jnp.float32), spec=spec)


def _x(n=64, seed=1):
    return (3.0 * np.random.default_rng(seed).standard_normal((n, D_IN))).astype(np.float32)


def _saelens_numpy_encode(cfg: dict, t: dict, x: np.ndarray) -> np.ndarray:
    """SAELens 6 inference encode (saes/*_sae.py), written out in NumPy float64."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    sae_in = x.astype(np.float64) - t["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        mag = np.maximum(sae_in @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"], 0)
        return gate * mag
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > t["threshold"])
    if arch == "topk":
        idx = np.argsort(-pre, axis=-1, kind="stable")[:, : cfg["k"]]
        out = np.zeros_like(pre)
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return out
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_export_matches_saelens_formulas_and_imports_back(arch, tmp_path):
    sae = _random_sae(arch)
    x = _x()
    z = np.asarray(encode(sae, x))
    assert (z > 0).sum(-1).mean() > 0.5  # the test data activates latents
    out = save_saelens(sae, tmp_path / "sae", hook_name="blocks.3.hook_resid_post",
                       model_name="gemma-3-270m", context_size=128, prepend_bos=True)
    cfg = json.loads((out / "cfg.json").read_text())
    t = load_file(str(out / "sae_weights.safetensors"))

    want_arch = {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    assert cfg["architecture"] == want_arch
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "gemma-3-270m"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    expected_tensors = {"W_enc", "W_dec", "b_dec"} | (
        {"b_gate", "r_mag", "b_mag"} if arch == "gated" else {"b_enc"}
    ) | ({"threshold"} if want_arch == "jumprelu" else set())
    assert set(t) == expected_tensors
    assert t["W_enc"].shape == (D_IN, D_SAE) and t["W_dec"].shape == (D_SAE, D_IN)
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False

    # What SAELens computes from these files equals jsae on raw activations.
    np.testing.assert_allclose(_saelens_numpy_encode(cfg, t, x), z, rtol=1e-4, atol=1e-4)
    x_hat = np.asarray(decode(sae, jnp.asarray(z)))
    np.testing.assert_allclose(z @ t["W_dec"] + t["b_dec"], x_hat, rtol=1e-4, atol=1e-4)

    # Import: identical to the folded SAE, and equal to the original up to rounding.
    back, meta = load_saelens(out)
    assert meta["hook_name"] == "blocks.3.hook_resid_post"
    assert float(back.norm_scale) == 1.0
    folded = fold_norm(sae)
    np.testing.assert_array_equal(np.asarray(encode(back, x)), np.asarray(encode(folded, x)))
    np.testing.assert_array_equal(np.asarray(decode(back, z)), np.asarray(decode(folded, z)))
    np.testing.assert_allclose(np.asarray(encode(back, x)), z, rtol=1e-5, atol=1e-5)
    # Export -> import -> export writes the same tensors.
    again = save_saelens(back, tmp_path / "again", hook_name="h", model_name="m")
    t2 = load_file(str(again / "sae_weights.safetensors"))
    for k in t:
        np.testing.assert_allclose(t2[k], t[k], rtol=1e-6, atol=0, err_msg=k)


def test_import_saelens_old_flat_config_and_bf16(tmp_path):
    sae = _random_sae("topk")
    out = save_saelens(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_pre",
                       model_name="gpt2")
    # Rewrite as a pre-6 flat cfg.json (hook_point, activation_fn_kwargs) with bf16 weights.
    old = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_pre",
           "model_name": "gpt2", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
           "apply_b_dec_to_input": True, "normalize_activations": False, "dtype": "bfloat16"}
    (out / "cfg.json").write_text(json.dumps(old))
    from safetensors.flax import load_file as load_flax
    from safetensors.flax import save_file as save_flax

    t = load_flax(str(out / "sae_weights.safetensors"))
    save_flax({k: v.astype(jnp.bfloat16) for k, v in t.items()},
              str(out / "sae_weights.safetensors"))
    back, meta = load_saelens(out)
    assert back.spec.architecture == "topk" and back.spec.options.k == 4
    assert meta["hook_name"] == "blocks.0.hook_resid_pre"
    folded = fold_norm(sae)
    rounded = folded.replace(params={k: v.astype(jnp.bfloat16).astype(jnp.float32)
                                     for k, v in folded.params.items()})
    for k, v in rounded.params.items():
        np.testing.assert_array_equal(np.asarray(back.params[k]), np.asarray(v), err_msg=k)
    np.testing.assert_array_equal(np.asarray(encode(back, _x())),
                                  np.asarray(encode(rounded, _x())))


def test_import_rejects_runtime_normalisation(tmp_path):
    out = save_saelens(_random_sae("relu"), tmp_path / "sae", hook_name="h", model_name="m")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="normalize_activations"):
        load_saelens(out)


def _gemmascope_numpy_encode(t, x):
    """Gemma Scope's JumpReLU: relu(x W_enc + b_enc) * (pre > threshold), no b_dec shift."""
    pre = x.astype(np.float64) @ t["W_enc"].astype(np.float64) + t["b_enc"]
    return np.maximum(pre, 0) * (pre > t["threshold"])


def test_load_gemmascope_npz_and_safetensors(tmp_path):
    rng = np.random.default_rng(3)
    t = {
        "W_enc": rng.standard_normal((D_IN, D_SAE)).astype(np.float32),
        "W_dec": rng.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "b_enc": (0.2 * rng.standard_normal(D_SAE)).astype(np.float32),
        "b_dec": rng.standard_normal(D_IN).astype(np.float32),
        "threshold": rng.uniform(0.5, 2.0, D_SAE).astype(np.float32),
    }
    x = _x()
    z_ref = _gemmascope_numpy_encode(t, x)
    x_hat_ref = z_ref @ t["W_dec"].astype(np.float64) + t["b_dec"]
    npz_dir = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_40"
    npz_dir.mkdir(parents=True)
    np.savez(npz_dir / "params.npz", **t)
    st_dir = tmp_path / "resid_post" / "layer_9_width_16k_l0_small"
    st_dir.mkdir(parents=True)  # Gemma Scope 2 names: lower-case w_enc / w_dec
    save_file({("w_" + k[2:] if k.startswith("W_") else k): v for k, v in t.items()},
              str(st_dir / "params.safetensors"))
    for path, hook in ((npz_dir, "blocks.5.hook_resid_post"),
                       (st_dir, "blocks.9.hook_resid_post")):
        sae, meta = load_gemmascope(path)
        assert sae.spec.architecture == "jumprelu" and sae.spec.d_sae == D_SAE
        assert meta["hook_name"] == hook
        z = np.asarray(encode(sae, x))
        assert ((z > 0) == (z_ref > 0)).all()
        np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(decode(sae, z)), x_hat_ref, rtol=1e-4, atol=1e-4)
    # jsae -> Gemma Scope params.npz -> jsae
    out = save_gemmascope(sae, tmp_path / "out")
    back, _ = load_gemmascope(out)
    np.testing.assert_allclose(np.asarray(encode(back, x)), z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_gemmascope_numpy_encode(dict(np.load(out)), x), z_ref,
                               rtol=1e-4, atol=1e-4)


# ---- a trained run, exported through the CLI ----------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = from_dict({
        "run_dir": str(run_dir),
        "data": {"source": "synthetic", "d_in": 16, "n_features": 64, "active_per_sample": 3},
        "sae": {"architecture": "topk", "d_sae": 64, "k": 3, "init_sample": 256},
        "train": {"steps": 20, "batch_size": 64, "lr": 3e-3, "lr_warmup_steps": 2,
                  "log_every": 10, "progress": False},
        "checkpoint": {"every_steps": 10, "keep": 2},
        "eval": {"tokens": 128},
    })
    tr = Trainer(cfg, make_source(cfg))
    ck = RunCheckpointer(cfg, tr)
    with pytest.MonkeyPatch.context() as mp:  # the training plot is not under test here
        mp.setattr("jsae.train.run.plot_metrics", lambda *a, **k: None)
        Run(cfg).train(tr, checkpointer=ck)
    ck.close()
    return run_dir, jax.device_get(tr.states["synthetic"].sae)


def test_cli_export_saelens_of_a_run(trained_run, tmp_path, capsys):
    run_dir, final = trained_run
    assert cli_main(["export", str(run_dir), str(tmp_path / "out"), "--format", "saelens"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_sae"] == 64
    assert cfg["metadata"]["hook_name"] == "synthetic"
    assert cfg["metadata"]["jsae_step"] == 20
    sae, _ = load_saelens(tmp_path / "out")
    x = make_source(from_dict({"data": {"source": "synthetic", "d_in": 16, "n_features": 64,
                                        "active_per_sample": 3}, "sae": {"d_sae": 64},
                               "train": {"steps": 1}})).next_batch(128)["synthetic"]
    np.testing.assert_allclose(np.asarray(encode(sae, x)), np.asarray(encode(final, x)),
                               rtol=1e-5, atol=1e-5)


def test_export_of_an_unfinished_run_uses_the_latest_checkpoint(trained_run, tmp_path):
    run_dir, final = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "saes")
    shutil.rmtree(copy / "checkpoints" / "20")
    sae, info = sae_from_run(copy)
    assert info["step"] == 10
    assert not np.array_equal(np.asarray(sae.params["W_enc"]), np.asarray(final.params["W_enc"]))
    (path,) = export_run(copy, tmp_path / "g", format="jsae")
    assert (path / "sae.safetensors").exists()
    with pytest.raises(ValueError, match="Gemma Scope format holds JumpReLU"):
        export_run(copy, tmp_path / "gs", format="gemmascope")


@pytest.mark.parametrize("fmt", ["circuit-tracer", "gemmascope2"])
def test_cli_export_of_an_sae_to_circuit_formats_is_refused(trained_run, tmp_path, capsys, fmt):
    """Circuit tracing's formats hold transcoders of a model's layers: a TopK SAE run is one
    line, exit 2, nothing written (tests/test_circuit_formats.py exports transcoders)."""
    run_dir, _ = trained_run
    out = tmp_path / "ct"
    assert cli_main(["export", str(run_dir), str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hold ReLU / JumpReLU transcoders" in err, err
    assert err.endswith("not topk") and not out.exists()


# ---- the real SAELens package ------------------------------------------------------------

_SAELENS_SCRIPT = r"""
import json, sys
import numpy as np, torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, GatedSAE, GatedSAEConfig
root = sys.argv[1]
x = torch.from_numpy(np.load(f"{root}/x.npy"))
report = {}
for name in json.loads(open(f"{root}/names.json").read()):
    sae = SAE.load_from_disk(f"{root}/{name}")
    with torch.no_grad():
        z = sae.encode(x)
        np.save(f"{root}/{name}.z.npy", z.numpy())
        np.save(f"{root}/{name}.xhat.npy", sae.decode(z).numpy())
    report[name] = {"cls": type(sae).__name__, "hook": sae.cfg.metadata.hook_name,
                    "model": sae.cfg.metadata.model_name, "d_sae": sae.cfg.d_sae}
# SAEs written by SAELens itself, for jsae to import.
torch.manual_seed(0)
d_in, d_sae = x.shape[1], 48
made = {
    "sl_standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae)),
    "sl_topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5)),
    "sl_jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)),
    "sl_gated": GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae)),
}
for name, sae in made.items():
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
        sae.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
        sae.save_model(f"{root}/{name}")
        np.save(f"{root}/{name}.z.npy", sae.encode(x).numpy())
print(json.dumps(report))
"""


@pytest.mark.slow
def test_exported_folders_load_in_real_saelens(tmp_path):
    saelens_python()
    x = _x(32)
    np.save(tmp_path / "x.npy", x)
    saes = {arch: _random_sae(arch, seed=i) for i, arch in enumerate(ARCHS)}
    for arch, sae in saes.items():
        save_saelens(sae, tmp_path / arch, hook_name="blocks.4.hook_resid_post",
                     model_name="gemma-3-270m")
    (tmp_path / "names.json").write_text(json.dumps(ARCHS))
    report = run_saelens(_SAELENS_SCRIPT, tmp_path)
    classes = {"relu": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
               "jumprelu": "JumpReLUSAE", "gated": "GatedSAE"}
    for arch, sae in saes.items():
        assert report[arch] == {"cls": classes[arch], "hook": "blocks.4.hook_resid_post",
                                "model": "gemma-3-270m", "d_sae": D_SAE}
        z = np.asarray(encode(sae, x))
        np.testing.assert_allclose(np.load(tmp_path / f"{arch}.z.npy"), z, rtol=1e-4,
                                   atol=1e-4, err_msg=arch)
        np.testing.assert_allclose(np.load(tmp_path / f"{arch}.xhat.npy"),
                                   np.asarray(decode(sae, jnp.asarray(z))), rtol=1e-4,
                                   atol=1e-4, err_msg=arch)
    for name in ("sl_standard", "sl_topk", "sl_jumprelu", "sl_gated"):
        sae, meta = load_saelens(tmp_path / name)
        assert meta["hook_name"] == "blocks.2.hook_resid_post"
        np.testing.assert_allclose(np.asarray(encode(sae, x)),
                                   np.load(tmp_path / f"{name}.z.npy"), rtol=1e-4, atol=1e-4,
                                   err_msg=name)

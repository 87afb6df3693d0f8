"""circuit-tracer and Gemma Scope 2 formats: transcoder sets (and CLTs) written by jsae equal the
formulas circuit-tracer 0.5.0 computes on their files (NumPy), import back to the same
dictionaries, load in the real circuit-tracer (side venv) with the same codes and outputs, and
bad folders are refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from circuit_tracer_side import circuit_tracer_python, run_circuit_tracer
from safetensors.numpy import load_file, save_file

from jsae.cli import main as cli_main
from jsae.errors import BadInput
from jsae.export import (
    gather,
    load_circuit_tracer,
    load_gemmascope,
    load_gemmascope2,
    save_circuit_tracer,
    save_gemmascope2,
)
from jsae.sae import SAE, SAESpec, decode, encode, reconstruct
from jsae.sae.archs import get_arch
from jsae.train.run import Run

D, N, LAYERS = 8, 24, 3
SET_ARCHS = ["jumprelu_transcoder", "jumprelu_skip_transcoder"]


def _transcoder(arch: str, seed: int) -> SAE:
    """A transcoder with every parameter non-trivial (norm_scale != 1, thresholds that let
    some but not all features fire)."""
    rng = np.random.default_rng(seed)
    p = {"W_enc": rng.standard_normal((D, N)) * 0.6, "W_dec": rng.standard_normal((N, D)) * 0.4,
         "b_enc": rng.standard_normal(N) * 0.1, "b_dec": rng.standard_normal(D) * 0.5,
         "log_threshold": np.log(rng.uniform(0.1, 0.8, N))}
    if get_arch(arch).skip:
        p["W_skip"] = rng.standard_normal((D, D)) * 0.3
    return SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
               norm_scale=jnp.asarray(0.4, jnp.float32), spec=SAESpec(arch, D, N))


def _set(arch: str, layers=range(LAYERS)):
    """(input hook, output hook, SAE) for each layer, as a run's transcoder set gives them."""
    return [(f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_mlp_out", _transcoder(arch, 10 * i))
            for i in layers]


def _x(seed=1, b=16):
    return (2.0 * np.random.default_rng(seed).standard_normal((LAYERS, b, D))).astype(np.float32)


def _jsae_outputs(dicts, x):
    """Per layer: jsae's codes and outputs of x[i] [B, D]."""
    zs, ys = [], []
    for (_, _, sae), xi in zip(dicts, x):
        z = encode(sae, jnp.asarray(xi))
        zs.append(np.asarray(z))
        ys.append(np.asarray(decode(sae, z, jnp.asarray(xi))))
    return np.stack(zs), np.stack(ys)


@pytest.mark.parametrize("arch", SET_ARCHS)
def test_circuit_tracer_files_compute_what_jsae_computes(arch, tmp_path):
    """circuit-tracer's formulas (SingleLayerTranscoder.encode / decode) on the written files."""
    dicts = _set(arch)
    save_circuit_tracer(gather(dicts, "gemma-3-270m"), tmp_path / "ct")
    cfg = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["model_name"] == "gemma-3-270m"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("hook_resid_mid",
                                                                       "hook_mlp_out")
    x = _x()
    z_j, y_j = _jsae_outputs(dicts, x)
    assert 0.05 < np.mean(z_j != 0) < 0.95
    for i in range(LAYERS):
        t = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "ct" / f"layer_{i}.safetensors")).items()}
        assert t["W_enc"].shape == (N, D) and t["W_dec"].shape == (N, D)
        pre = x[i] @ t["W_enc"].T + t["b_enc"]
        z = pre * (pre > t["activation_function.threshold"])
        y = z @ t["W_dec"] + t["b_dec"] + (x[i] @ t["W_skip"].T if "W_skip" in t else 0.0)
        np.testing.assert_allclose(z, z_j[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y, y_j[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", SET_ARCHS)
def test_gemmascope2_files_compute_what_jsae_computes(arch, tmp_path):
    dicts = _set(arch)
    save_gemmascope2(gather(dicts, "gemma-3-270m"), tmp_path / "gs")
    x = _x()
    z_j, y_j = _jsae_outputs(dicts, x)
    for i in range(LAYERS):
        f = tmp_path / "gs" / f"layer_{i}"
        t = {k: v.astype(np.float64) for k, v in load_file(str(f / "params.safetensors")).items()}
        pre = x[i] @ t["w_enc"] + t["b_enc"]
        z = pre * (pre > t["threshold"])
        skip = x[i] @ t["affine_skip_connection"] if "affine_skip_connection" in t else 0.0
        np.testing.assert_allclose(z @ t["w_dec"] + t["b_dec"] + skip, y_j[i], rtol=1e-4,
                                   atol=1e-4)
        cfg = json.loads((f / "config.json").read_text())
        assert cfg["hf_hook_point_out"] == f"model.layers.{i}.post_feedforward_layernorm.output"
        # each layer's folder also loads alone through the Gemma Scope importer
        one, meta = load_gemmascope(f)
        assert meta["hook_name"] == f"blocks.{i}.hook_resid_mid"
        np.testing.assert_allclose(np.asarray(reconstruct(one, jnp.asarray(x[i]))), y_j[i],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["circuit-tracer", "gemmascope2"])
@pytest.mark.parametrize("arch", SET_ARCHS)
def test_import_gives_back_the_same_dictionaries(arch, fmt, tmp_path):
    dicts = _set(arch)
    save, load = ((save_circuit_tracer, load_circuit_tracer) if fmt == "circuit-tracer"
                  else (save_gemmascope2, load_gemmascope2))
    save(gather(dicts, "gemma-3-270m"), tmp_path / "f")
    back, meta = load(tmp_path / "f")
    assert list(back) == [h for h, _, _ in dicts]
    assert meta["hook_names_out"] == {h: o for h, o, _ in dicts}
    assert meta["model_name"] == "gemma-3-270m"
    x = _x(seed=2)
    for (h, _, sae), xi in zip(dicts, x):
        assert back[h].spec.architecture == arch
        np.testing.assert_allclose(np.asarray(reconstruct(back[h], jnp.asarray(xi))),
                                   np.asarray(reconstruct(sae, jnp.asarray(xi))), rtol=1e-4,
                                   atol=1e-4)


def test_relu_transcoder_file_imports_exactly(tmp_path):
    """circuit-tracer's ReLU transcoders (no threshold in the file) import as threshold 0."""
    save_circuit_tracer(gather(_set(SET_ARCHS[0])), tmp_path / "ct")
    for i in range(LAYERS):
        f = tmp_path / "ct" / f"layer_{i}.safetensors"
        t = load_file(str(f))
        del t["activation_function.threshold"]
        save_file(t, str(f))
    back, _ = load_circuit_tracer(tmp_path / "ct")
    x = _x()[0]
    t = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "ct" / "layer_0.safetensors")).items()}
    want = np.maximum(x @ t["W_enc"].T + t["b_enc"], 0) @ t["W_dec"] + t["b_dec"]
    got = reconstruct(back["blocks.0.hook_resid_mid"], jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ---- refusals: one line, nothing written -------------------------------------------------


def test_topk_transcoders_and_gaps_are_refused_before_writing(tmp_path):
    topk = [(h, o, SAE(params=s.params, norm_scale=s.norm_scale,
                       spec=SAESpec("transcoder", D, N, k=4)))
            for h, o, s in _set(SET_ARCHS[0])]
    with pytest.raises(BadInput, match="ReLU / JumpReLU transcoders .*not transcoder$"):
        gather(topk)
    with pytest.raises(BadInput, match=r"every layer 0\.\.2; missing layer\(s\) 1"):
        save_circuit_tracer(gather(_set(SET_ARCHS[0], layers=[0, 2])), tmp_path / "ct")
    mixed = _set(SET_ARCHS[0], layers=[0]) + _set(SET_ARCHS[1], layers=[1])
    with pytest.raises(BadInput, match="skip connection and some not"):
        gather(mixed)
    assert not (tmp_path / "ct").exists()


@pytest.fixture
def ct_folder(tmp_path):
    save_circuit_tracer(gather(_set(SET_ARCHS[1]), "gemma-3-270m"), tmp_path / "ct")
    return tmp_path / "ct"


def _cli_refuses(capsys, src, out, fmt="jsae"):
    assert cli_main(["export", str(src), str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_cli_converts_a_circuit_tracer_folder(ct_folder, tmp_path, capsys):
    assert cli_main(["export", str(ct_folder), str(tmp_path / "gs"), "--format",
                     "gemmascope2"]) == 0
    back, _ = load_gemmascope2(tmp_path / "gs")
    orig, _ = load_circuit_tracer(ct_folder)
    x = jnp.asarray(_x()[1])
    h = "blocks.1.hook_resid_mid"
    np.testing.assert_allclose(np.asarray(reconstruct(back[h], x)),
                               np.asarray(reconstruct(orig[h], x)), rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_folder_missing_a_layer(ct_folder, tmp_path, capsys):
    (ct_folder / "layer_1.safetensors").unlink()
    err = _cli_refuses(capsys, ct_folder, tmp_path / "out")
    assert "layer_1.safetensors is missing" in err and "found layers 0, 2" in err


def test_cli_refuses_mismatched_shapes(ct_folder, tmp_path, capsys):
    f = ct_folder / "layer_2.safetensors"
    t = load_file(str(f))
    t["W_dec"] = t["W_dec"][:, :5].copy()
    save_file(t, str(f))
    err = _cli_refuses(capsys, ct_folder, tmp_path / "out")
    assert "layer_2.safetensors: tensor 'W_dec' has shape [24, 5]; expected [24, 8]" in err
    t = load_file(str(ct_folder / "layer_0.safetensors"))
    save_file({**t, "W_enc": np.zeros((N, D + 1), np.float32)}, str(f))
    err = _cli_refuses(capsys, ct_folder, tmp_path / "out")
    assert "layer_2.safetensors: tensor 'W_enc' has shape [24, 9]; expected [24, 8]" in err


def test_cli_refuses_a_bad_config(ct_folder, tmp_path, capsys):
    (ct_folder / "config.yaml").write_text("model_kind: graph\nfeature_input_hook: x\n")
    err = _cli_refuses(capsys, ct_folder, tmp_path / "out")
    assert "config.yaml: field 'model_kind' is 'graph'" in err


def test_gemmascope2_set_missing_a_tensor_is_one_line(tmp_path, capsys):
    save_gemmascope2(gather(_set(SET_ARCHS[0])), tmp_path / "gs")
    f = tmp_path / "gs" / "layer_1" / "params.safetensors"
    t = load_file(str(f))
    del t["threshold"]
    save_file(t, str(f))
    err = _cli_refuses(capsys, tmp_path / "gs", tmp_path / "out")
    assert "layer_1/params.safetensors: tensor 'threshold' is missing" in err


# ---- the real circuit-tracer ------------------------------------------------------------

_CT_SCRIPT = r"""
import json, sys
import numpy as np, torch
import circuit_tracer
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
root = sys.argv[1]
x = torch.from_numpy(np.load(f"{root}/x.npy"))
report = {"version": circuit_tracer.__version__ if hasattr(circuit_tracer, "__version__") else None}
for name in json.loads(open(f"{root}/names.json").read()):
    kind, folder = name.split("/")
    if kind == "ct":  # a local folder: circuit-tracer's cache layout (config.yaml + files)
        tc, cfg = load_transcoder_from_hub(folder, cache_dir=f"{root}/ct", device=torch.device("cpu"),
                                           dtype=torch.float32)
    else:  # Gemma Scope 2 files, through circuit-tracer's own Gemma Scope 2 loader
        n = len(x)
        tc = load_transcoder_set({i: f"{root}/gs/{folder}/layer_{i}/params.safetensors" for i in range(n)},
                                 scan="jsae", feature_input_hook="hook_resid_mid",
                                 feature_output_hook="hook_mlp_out", special_load_fn="gemma-scope-2",
                                 device=torch.device("cpu"), dtype=torch.float32,
                                 lazy_encoder=False, lazy_decoder=False)
        cfg = {}
    with torch.no_grad():
        z = tc.encode(x)
        y = tc.decode(z, x)
    np.save(f"{root}/{kind}_{folder}.z.npy", z.numpy())
    np.save(f"{root}/{kind}_{folder}.y.npy", y.numpy())
    report[name] = {"cls": type(tc).__name__, "n_layers": tc.n_layers, "skip": tc.skip_connection,
                    "in": tc.feature_input_hook, "out": tc.feature_output_hook,
                    "model": cfg.get("model_name")}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_real_circuit_tracer_loads_jsae_transcoder_sets(tmp_path):
    circuit_tracer_python()
    x = _x(seed=3)
    np.save(tmp_path / "x.npy", x)
    names, want = [], {}
    for arch in SET_ARCHS:
        dicts = _set(arch)
        c = gather(dicts, "google/gemma-3-270m")
        save_circuit_tracer(c, tmp_path / "ct" / arch)
        save_gemmascope2(c, tmp_path / "gs" / arch)
        names += [f"ct/{arch}", f"gs/{arch}"]
        want[arch] = _jsae_outputs(dicts, x)
    (tmp_path / "names.json").write_text(json.dumps(names))
    report = run_circuit_tracer(_CT_SCRIPT, tmp_path)
    for name in names:
        kind, arch = name.split("/")
        skip = get_arch(arch).skip
        assert report[name] == {"cls": "TranscoderSet", "n_layers": LAYERS, "skip": skip,
                                "in": "hook_resid_mid", "out": "hook_mlp_out",
                                "model": "google/gemma-3-270m" if kind == "ct" else None}, name
        z, y = want[arch]
        np.testing.assert_allclose(np.load(tmp_path / f"{kind}_{arch}.z.npy"), z, rtol=1e-4,
                                   atol=1e-4, err_msg=name)
        np.testing.assert_allclose(np.load(tmp_path / f"{kind}_{arch}.y.npy"), y, rtol=1e-4,
                                   atol=1e-4, err_msg=name)
    shutil.rmtree(tmp_path / "ct")


# ---- cross-layer transcoders --------------------------------------------------------------

NF = 8  # features per layer


def _clt(activation: str = "jumprelu", seed: int = 0) -> SAE:
    """A CLT over LAYERS layers with noise in the masked decoder entries too (jsae's forward
    masks them; an export must write zeros there)."""
    rng = np.random.default_rng(seed)
    L = LAYERS
    p = {"W_enc": rng.standard_normal((L, D, NF)) * 0.6,
         "W_dec": rng.standard_normal((L * NF, L, D)) * 0.4,
         "b_enc": rng.standard_normal(L * NF) * 0.1, "b_dec": rng.standard_normal((L, D)) * 0.5,
         # per-layer scales as training sets them: an export must fold them into the weights
         "in_scale": rng.uniform(0.5, 2.0, L), "out_scale": rng.uniform(0.5, 2.0, L)}
    theta = rng.uniform(0.1, 0.8, L * NF)
    if activation == "jumprelu":
        p["log_threshold"] = np.log(theta)
    elif activation == "batchtopk":
        p["ema_threshold"] = theta
    return SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
               norm_scale=jnp.asarray(0.4, jnp.float32),
               spec=SAESpec("clt", D, L * NF, n_layers=L, activation=activation, k=2))


CLT_KEY = "+".join(f"blocks.{i}.mlp.hook_in" for i in range(LAYERS))
CLT_OUT = "+".join(f"blocks.{i}.hook_mlp_out" for i in range(LAYERS))
CLT_ACTS = ["jumprelu", "batchtopk"]


def _clt_outputs(sae, x):
    """jsae's codes [L, B, NF] and outputs [L, B, D] of x [L, B, D] (circuit-tracer's order)."""
    xb = jnp.asarray(np.moveaxis(x, 0, 1))  # [B, L, D]
    z = encode(sae, xb)
    y = decode(sae, z)
    z = np.asarray(z).reshape(x.shape[1], LAYERS, NF)
    return np.moveaxis(z, 1, 0), np.moveaxis(np.asarray(y), 1, 0)


@pytest.mark.parametrize("act", CLT_ACTS)
def test_clt_files_compute_what_jsae_computes(act, tmp_path):
    sae = _clt(act)
    c = gather([(CLT_KEY, CLT_OUT, sae)], "gemma-3-270m")
    save_circuit_tracer(c, tmp_path / "ct")
    save_gemmascope2(c, tmp_path / "gs")
    cfg = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in",
                                                                       "hook_mlp_out")
    x = _x(seed=4)
    z_j, y_j = _clt_outputs(sae, x)
    assert 0.05 < np.mean(z_j != 0) < 0.95
    ct = [{**load_file(str(tmp_path / "ct" / f"W_enc_{i}.safetensors")),
           **load_file(str(tmp_path / "ct" / f"W_dec_{i}.safetensors"))} for i in range(LAYERS)]
    gs = [load_file(str(tmp_path / "gs" / f"params_layer_{i}.safetensors")) for i in range(LAYERS)]
    z_ct, z_gs = [], []
    for i in range(LAYERS):
        assert ct[i][f"W_dec_{i}"].shape == (NF, LAYERS - i, D)
        pre = x[i] @ ct[i][f"W_enc_{i}"].T.astype(np.float64) + ct[i][f"b_enc_{i}"]
        z_ct.append(pre * (pre > ct[i][f"threshold_{i}"]))
        pre = x[i] @ gs[i]["w_enc"].astype(np.float64) + gs[i]["b_enc"]
        z_gs.append(pre * (pre > gs[i]["threshold"]))
        assert not gs[i]["w_dec"][:, :i].any()  # no writes to earlier layers
    for t in range(LAYERS):
        y_ct = ct[t][f"b_dec_{t}"] + sum(z_ct[s] @ ct[s][f"W_dec_{s}"][:, t - s]
                                          for s in range(t + 1))
        y_gs = gs[t]["b_dec"] + sum(z_gs[s] @ gs[s]["w_dec"][:, t] for s in range(LAYERS))
        np.testing.assert_allclose(z_ct[t], z_j[t], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y_ct, y_j[t], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y_gs, y_j[t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["circuit-tracer", "gemmascope2"])
def test_clt_import_gives_back_the_same_dictionary(fmt, tmp_path):
    sae = _clt("jumprelu", seed=1)
    save, load = ((save_circuit_tracer, load_circuit_tracer) if fmt == "circuit-tracer"
                  else (save_gemmascope2, load_gemmascope2))
    save(gather([(CLT_KEY, CLT_OUT, sae)], "gemma-3-270m"), tmp_path / "f")
    back, meta = load(tmp_path / "f")
    assert list(back) == [CLT_KEY] and meta["hook_names_out"] == {CLT_KEY: CLT_OUT}
    assert back[CLT_KEY].spec.architecture == "clt"
    assert back[CLT_KEY].spec.options.n_layers == LAYERS
    x = jnp.asarray(np.moveaxis(_x(seed=5), 0, 1))
    np.testing.assert_allclose(np.asarray(reconstruct(back[CLT_KEY], x)),
                               np.asarray(reconstruct(sae, x)), rtol=1e-4, atol=1e-4)


def test_clt_refusals_are_one_line(tmp_path, capsys):
    with pytest.raises(BadInput, match=r"^blocks\.0\.mlp\.hook_in\+.*a CLT with activation "
                                       r"topk selects the top k"):
        gather([(CLT_KEY, CLT_OUT, _clt("topk"))])
    save_circuit_tracer(gather([(CLT_KEY, CLT_OUT, _clt())]), tmp_path / "ct")
    (tmp_path / "ct" / "W_dec_1.safetensors").unlink()
    err = _cli_refuses(capsys, tmp_path / "ct", tmp_path / "out")
    assert "W_dec_1.safetensors is missing" in err
    save_gemmascope2(gather([(CLT_KEY, CLT_OUT, _clt())]), tmp_path / "gs")
    f = tmp_path / "gs" / "params_layer_2.safetensors"
    t = load_file(str(f))
    t["w_dec"][:, 0] = 1.0
    save_file(t, str(f))
    err = _cli_refuses(capsys, tmp_path / "gs", tmp_path / "out")
    assert "params_layer_2.safetensors: tensor 'w_dec' writes layers before 2" in err
    (tmp_path / "gs" / "params_layer_1.safetensors").unlink()
    err = _cli_refuses(capsys, tmp_path / "gs", tmp_path / "out")
    assert "params_layer_1.safetensors is missing" in err


_CT_CLT_SCRIPT = r"""
import json, sys
import numpy as np, torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
root = sys.argv[1]
x = torch.from_numpy(np.load(f"{root}/x.npy"))  # [L, B, d]
L, cpu = len(x), torch.device("cpu")
loaded = {"ct": load_transcoder_from_hub("clt", cache_dir=f"{root}/ct", device=cpu,
                                         dtype=torch.float32)[0]}
# circuit-tracer 0.5.0 reads layers range(max(paths)), one short of a {0..L-1} dict (its
# off-by-one): the last key is never opened, so one unused key makes it read every layer
paths = {i: f"{root}/gs/params_layer_{i}.safetensors" for i in range(L)}
loaded["gs"] = load_gemma_scope_2_clt({**paths, L: "unused"}, device=cpu, dtype=torch.float32)
report = {}
for kind, tc in loaded.items():
    with torch.no_grad():
        z = tc.encode(x)
        y = tc.decode(z)
    np.save(f"{root}/{kind}.z.npy", z.numpy())
    np.save(f"{root}/{kind}.y.npy", y.numpy())
    report[kind] = {"cls": type(tc).__name__, "n_layers": tc.n_layers, "n": tc.d_transcoder,
                    "in": tc.feature_input_hook, "out": tc.feature_output_hook}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_real_circuit_tracer_loads_jsae_clts(tmp_path):
    circuit_tracer_python()
    sae = _clt("jumprelu", seed=6)
    x = _x(seed=7)
    x[:, -1] *= 4.0  # the last position has active features (circuit-tracer sizes its
    np.save(tmp_path / "x.npy", x)  # sparse decode by the last active position)
    c = gather([(CLT_KEY, CLT_OUT, sae)], "google/gemma-3-270m")
    save_circuit_tracer(c, tmp_path / "ct" / "clt")
    save_gemmascope2(c, tmp_path / "gs")
    report = run_circuit_tracer(_CT_CLT_SCRIPT, tmp_path)
    z, y = _clt_outputs(sae, x)
    assert np.all((z != 0).any(axis=(0, 2)))
    assert report["ct"] == {"cls": "CrossLayerTranscoder", "n_layers": LAYERS, "n": NF,
                            "in": "mlp.hook_in", "out": "hook_mlp_out"}
    assert report["gs"]["cls"] == "CrossLayerTranscoder" and report["gs"]["n_layers"] == LAYERS
    for kind in ("ct", "gs"):
        np.testing.assert_allclose(np.load(tmp_path / f"{kind}.z.npy"), z, rtol=1e-4, atol=1e-4,
                                   err_msg=kind)
        np.testing.assert_allclose(np.load(tmp_path / f"{kind}.y.npy"), y, rtol=1e-4, atol=1e-4,
                                   err_msg=kind)


# ---- a trained set, end to end --------------------------------------------------------------


def test_cli_exports_a_trained_transcoder_set(tmp_path, capsys):
    """`jsae export RUN --format circuit-tracer` on a set trained from one LM pass (a tiny
    3-layer Gemma-3-shaped model): every layer's transcoder in one folder, equal to the run's."""
    from test_steering_helpers import TinyModel, tiny_config
    from test_transcoder_sets import _raw, _source

    from jsae import config
    from jsae.runs import sae_from_run
    from jsae.train.loop import Trainer

    model = TinyModel(tiny_config(layers=LAYERS))
    raw = _raw(tmp_path, arch="jumprelu_skip_transcoder")
    raw["model"]["name"] = "tiny-gemma-3"
    raw["train"]["steps"] = 3
    cfg = config.from_dict(raw)
    Run(cfg, log=lambda s: None).train(Trainer(cfg, _source(cfg, model)))
    run, out = tmp_path / "run", tmp_path / "ct"
    assert cli_main(["export", str(run), str(out), "--format", "circuit-tracer"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg_ct = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg_ct["feature_input_hook"], cfg_ct["feature_output_hook"],
            cfg_ct["model_name"]) == ("mlp.hook_in", "hook_mlp_out", "tiny-gemma-3")
    back, meta = load_circuit_tracer(out)
    for i in range(LAYERS):
        h = f"blocks.{i}.mlp.hook_in"
        assert meta["hook_names_out"][h] == f"blocks.{i}.hook_mlp_out"
        sae, _ = sae_from_run(run, h)
        x = jnp.asarray(np.random.default_rng(i).standard_normal((16, sae.spec.d_in)) * 3,
                        jnp.float32)
        assert 0 < float(jnp.mean(encode(sae, x) != 0)) < 1
        np.testing.assert_allclose(np.asarray(reconstruct(back[h], x)),
                                   np.asarray(reconstruct(sae, x)), rtol=1e-4, atol=1e-4)
    # the same run, one layer only: circuit-tracer needs them all (one line, nothing written)
    assert cli_main(["export", str(run), str(tmp_path / "one"), "--format", "circuit-tracer",
                     "--hook", "blocks.1.mlp.hook_in"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing layer(s) 0" in err, err
    assert not (tmp_path / "one").exists()

"""Issue 25, part 2: files jsae reads back are checked field by field, and a damaged one is
refused in one line naming the file and the field (exit code 2), never a traceback; values a
user gives that cannot work (a duplicate steering feature, a value beyond float32) likewise.

One tiny synthetic run (no language model) serves the whole module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_bad_input import TINY as TINY_BAD_INPUT

from jsae.cli import main
from jsae.errors import BadInput, FileFormatError, JsaeError

TINY = TINY_BAD_INPUT.replace("steps: 20, batch_size: 128", "steps: 6, batch_size: 64").replace(
    "every_steps: 10, keep: 2", "every_steps: 100, keep: 1").replace("tokens: 256", "tokens: 128")


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(f).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def cli(argv, capsys) -> tuple[int, str]:
    """(exit code, the stderr line) of `jsae ARGV` in this process; exactly one stderr line."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return rc, err[0]


def refused(argv, capsys, files: list[Path], *needles: str) -> str:
    """Run `jsae ARGV`: exit 2, one line holding every needle, ``files`` unchanged."""
    before = [tree_hash(f) for f in files]
    rc, line = cli(argv, capsys)
    assert rc == 2, line
    assert line.startswith(f"jsae {argv[0]}: "), line
    for n in needles:
        assert n in line, (n, line)
    assert [tree_hash(f) for f in files] == before
    return line


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from jsae.export.saelens import save_saelens
    from jsae.monitor import Detector, decoder_sha256
    from jsae.sae.io import load_sae

    root = tmp_path_factory.mktemp("readval")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    run = root / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    sae, _ = load_sae(run / "saes" / "synthetic")
    save_saelens(sae, root / "saelens", hook_name="synthetic", model_name="none")
    det = Detector("synthetic", [1, 5], "threshold", decoder_sha256(sae), 64,
                   thresholds=[0.5, None], scale=[1.0, 2.0])
    det.save(root / "det.json")
    return root, cfg, run, sae


# ---- detectors: `jsae monitor RUN --detector FILE` -----------------------------------------

DETECTOR_CASES = [  # (id, change to the saved JSON, needles)
    ("feature-out-of-range", {"features": [1, 64]}, "'features[1]'"),
    ("feature-duplicate", {"features": [5, 5]}, "'features'"),
    ("feature-bool", {"features": [True, 5]}, "'features[0]'"),
    ("weights-length", {"thresholds": [0.5]}, "'thresholds'"),
    ("scale-length", {"scale": [1.0, 2.0, 3.0]}, "'scale'"),
    ("threshold-nan", {"thresholds": [float("nan"), 0.1]}, "'thresholds[0]'"),
    ("threshold-f32", {"thresholds": [1e39, 0.1]}, "'thresholds[0]'"),
    ("scale-zero", {"scale": [0.0, 1.0]}, "'scale[0]'"),
    ("d_sae-string", {"d_sae": "64"}, "'d_sae'"),
    ("kind", {"kind": "magic"}, "'kind'"),
    ("hook-type", {"hook": 3}, "'hook'"),
    ("sha", {"sae_sha256": "abc"}, "'sae_sha256'"),
    ("probe-missing-coef", {"kind": "probe", "intercept": 0.0, "mean": [0, 0]}, "'coef'"),
    ("context-length", {"context_length": -1}, "'context_length'"),
]


@pytest.mark.parametrize("case,change,needle", DETECTOR_CASES, ids=[c[0] for c in DETECTOR_CASES])
def test_damaged_detector_is_refused(work, capsys, case, change, needle):
    root, _, run, _ = work
    d = json.loads((root / "det.json").read_text())
    d.update(change)
    f = root / f"det-{case}.json"
    f.write_text(json.dumps(d))  # NaN is written as the literal NaN, as a hand edit could
    refused(["monitor", run, "--detector", f, "--text", "hello"], capsys, [f, run], str(f), needle)


def test_detector_not_json_or_not_utf8(work, capsys):
    root, _, run, _ = work
    for name, data in (("trunc.json", (root / "det.json").read_bytes()[:40]),
                       ("latin.json", b'{"format": "jsae-detector", "hook": "caf\xe9"}')):
        f = root / name
        f.write_bytes(data)
        refused(["monitor", run, "--detector", f, "--text", "hi"], capsys, [f], str(f))


def test_intact_detector_still_loads(work):
    from jsae.monitor import Detector

    root = work[0]
    det = Detector.load(root / "det.json")
    assert det.features == [1, 5] and det.thresholds == [0.5, None]


# ---- SAELens folders: `jsae eval FOLDER` ----------------------------------------------------


def _saelens_copy(root: Path, name: str) -> Path:
    d = root / f"sl-{name}"
    shutil.copytree(root / "saelens", d)
    return d


def _edit_tensors(folder: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(folder / "sae_weights.safetensors"))
    fn(t)
    save_file(t, str(folder / "sae_weights.safetensors"))


SAELENS_CASES = [  # (id, edit of the tensors, needles)
    ("W_dec-shape", lambda t: t.update(W_dec=t["W_dec"][:, :8].copy()), "W_dec"),
    ("b_enc-nan", lambda t: t["b_enc"].__setitem__(3, np.nan), "'b_enc'"),
    ("W_enc-rank", lambda t: t.update(W_enc=t["W_enc"].reshape(-1).copy()), "'W_enc'"),
    ("b_dec-missing", lambda t: t.pop("b_dec"), "'b_dec'"),
]


@pytest.mark.parametrize("case,edit,needle", SAELENS_CASES, ids=[c[0] for c in SAELENS_CASES])
def test_damaged_saelens_weights_are_refused(work, capsys, case, edit, needle):
    root = work[0]
    d = _saelens_copy(root, case)
    _edit_tensors(d, edit)
    refused(["eval", d, "--no-downstream"], capsys, [d], "sae_weights.safetensors", needle)


@pytest.mark.parametrize("case,change,needle", [
    ("d_in-type", {"d_in": "sixteen"}, "'d_in'"),
    ("d_in-mismatch", {"d_in": 17}, "d_in=17"),
    ("k-type", {"k": 2.5}, "'k'"),
    ("not-json", None, "cfg.json"),
], ids=["d_in-type", "d_in-mismatch", "k-type", "not-json"])
def test_damaged_saelens_cfg_is_refused(work, capsys, case, change, needle):
    root = work[0]
    d = _saelens_copy(root, "cfg-" + case)
    if change is None:
        (d / "cfg.json").write_text('{"architecture": "topk",')
    else:
        cfg = json.loads((d / "cfg.json").read_text())
        cfg.update(change)
        (d / "cfg.json").write_text(json.dumps(cfg))
    refused(["eval", d, "--no-downstream"], capsys, [d], str(d / "cfg.json"), needle)


def test_damaged_sae_json_spec_is_refused(work, capsys):
    root, _, run, _ = work
    d = root / "sae-copy"
    shutil.copytree(run / "saes" / "synthetic", d)
    info = json.loads((d / "sae.json").read_text())
    info["spec"]["d_sae"] = -4
    (d / "sae.json").write_text(json.dumps(info))
    refused(["eval", d, "--no-downstream"], capsys, [d], "sae.json", "'spec.d_sae'")


def test_gemmascope_damaged_npz_is_refused(work):
    from jsae.export.gemmascope import load_gemmascope

    d = work[0] / "gs"
    d.mkdir()
    (d / "params.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FileFormatError, match="params.npz"):
        load_gemmascope(d)
    rng = np.random.default_rng(0)
    np.savez(d / "params.npz", W_enc=rng.normal(size=(4, 8)), W_dec=rng.normal(size=(8, 4)),
             b_enc=np.zeros(8), b_dec=np.zeros(4), threshold=np.full(8, np.inf))
    with pytest.raises(FileFormatError, match=r"params.npz: tensor 'threshold' holds 8 non-finite"):
        load_gemmascope(d)


# ---- .npy data and caches: `jsae train` -----------------------------------------------------


def _train_refused(work, capsys, source: str, path: Path, *needles: str) -> str:
    root, cfg, _, _ = work
    new = root / f"new-{path.name}"
    line = refused(["train", cfg, "--run-dir", new, "--set", f"data.source={source}",
                    "--set", f"data.path={path}"], capsys, [path], *needles)
    return line


@pytest.mark.parametrize("case,array", [
    ("rank3", np.zeros((4, 4, 16), np.float32)),
    ("rank1", np.zeros((16,), np.float32)),
    ("no-rows", np.zeros((0, 16), np.float32)),
    ("no-columns", np.zeros((300, 0), np.float32)),
], ids=["rank3", "rank1", "no-rows", "no-columns"])
def test_npy_of_wrong_rank_or_empty_is_refused(work, capsys, case, array):
    f = work[0] / f"{case}.npy"
    np.save(f, array)
    _train_refused(work, capsys, "array", f, str(f), "[N, d_in]")


def test_npy_not_an_array_file_is_refused(work, capsys):
    f = work[0] / "text.npy"
    f.write_text("not numpy at all\n")
    _train_refused(work, capsys, "array", f, str(f), "not a readable .npy")


def _manifest() -> dict:
    return {"format": "jsae-activation-cache", "version": 1, "process_index": 0,
            "process_count": 1, "model": "m", "hooks": ["h"], "d_in": {"h": 16},
            "dtype": "float32", "context_length": 32, "shard_rows": 64,
            "splits": {sp: {"shards": [{"file": f"{sp}/shard-000000.safetensors", "rows": 64,
                                        "bytes": 10, "sha256": "0" * 64}],
                            "rows": 64, "complete": True, "resume": None}
                       for sp in ("train", "eval")},
            "stats": {}, "tokens": 64}


MANIFEST_CASES = [  # (id, change, needles)
    ("not-json", "{format: jsae", "invalid JSON"),
    ("not-utf8", b'{"format": "jsae-activation-cache", "model": "\xff"}', "not UTF-8"),
    ("d_in-type", {"d_in": {"h": "16"}}, "'d_in.h'"),
    ("hooks-type", {"hooks": "h"}, "'hooks'"),
    ("rows-inconsistent", {"tokens": 65}, "'tokens'"),
    ("shard-outside", {"splits": {"train": {"shards": [{"file": "../x", "rows": 64}], "rows": 64,
                                            "complete": True},
                                  "eval": {"shards": [], "rows": 0, "complete": True}}},
     "'splits.train.shards[0].file'"),
    ("split-rows", {"splits": {"train": {"shards": [], "rows": 5, "complete": True},
                               "eval": {"shards": [], "rows": 0, "complete": True}}},
     "'splits.train.rows'"),
    ("process-index", {"process_index": 3}, "'process_index'"),
]


@pytest.mark.parametrize("case,change,needle", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_damaged_cache_manifest_is_refused(work, capsys, case, change, needle):
    d = work[0] / f"cache-{case}"
    d.mkdir()
    if isinstance(change, (str, bytes)):
        (d / "manifest.json").write_bytes(change.encode() if isinstance(change, str) else change)
    else:
        (d / "manifest.json").write_text(json.dumps({**_manifest(), **change}))
    _train_refused(work, capsys, "cache", d, str(d / "manifest.json"), needle)


def test_damaged_cache_shard_header_is_refused():
    from jsae.data.cache import DamagedShardError, parse_safetensors

    header = json.dumps({"h": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    buf = len(header).to_bytes(8, "little") + header + bytes(8)
    with pytest.raises(DamagedShardError, match="do not hold shape"):
        parse_safetensors(buf, where="x/train/shard.safetensors")
    header = json.dumps({"h": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(DamagedShardError, match="bad header entry"):
        parse_safetensors(len(header).to_bytes(8, "little") + header + bytes(1), where="s")


# ---- values a user gives ------------------------------------------------------------------


def test_steering_refuses_duplicates_and_values_beyond_float32(work):
    from jsae import steering

    sae = work[3]
    with pytest.raises(BadInput, match=r"repeated: \[3\]"):
        steering.clamp(sae, [3, 3], 1.0)
    for v in (1e39, -1e39, float("nan")):
        with pytest.raises(BadInput, match="value"):
            steering.clamp(sae, 3, v)
    with pytest.raises(BadInput, match="beyond float32"):
        steering.scale(sae, [3, 4], [1.0, 1e40])
    with pytest.raises(BadInput, match="float32"):
        steering.add_feature(sae, ["synthetic"], [3], [1e39])
    with pytest.raises(BadInput, match="coefficient"):
        steering.add(np.ones(16), 1e39)
    steering.clamp(sae, [3, 4], [3e38, -1.0])  # large but finite in float32: fine


def test_non_utf8_text_file_is_refused(tmp_path):
    from jsae.data.text import FileDocuments, read_text_file

    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(FileFormatError, match=r"latin1.txt: not UTF-8 text .* at byte 3"):
        read_text_file(f)
    with pytest.raises(FileFormatError, match="latin1.txt"):
        FileDocuments(str(f))[0]
    j = tmp_path / "docs.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FileFormatError, match=r"docs.jsonl:2: not UTF-8"):
        FileDocuments(str(j))
    j.write_bytes(b'{"text": "ok"}\n{"text": \n[1, 2]\n')
    docs = FileDocuments(str(j))
    with pytest.raises(FileFormatError, match="not valid JSON"):
        docs[1]
    with pytest.raises(FileFormatError, match="a JSON list"):
        docs[2]


def test_fvu_is_right_for_huge_and_tiny_finite_activations(work):
    import jax.numpy as jnp

    from jsae.evals.reconstruction import ReconstructionStats
    from jsae.sae.core import reconstruct

    sae = work[3]
    x = np.random.default_rng(1).normal(size=(96, 16)).astype(np.float32)
    for big in (1.0, 1e30, 1e-30):
        xb = x * np.float32(big)
        st = ReconstructionStats()
        st.add(sae, xb[:50])
        st.add(sae, xb[50:])
        r = st.result()
        xh = np.asarray(reconstruct(sae, jnp.asarray(xb)), np.float64)
        X = xb.astype(np.float64)
        ref = ((X - xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
        assert np.isfinite(r["fvu"]) and r["fvu"] == pytest.approx(ref, rel=1e-4), (big, r["fvu"])
        assert np.isfinite(r["mse"]) and np.isfinite(r["cos_sim"])


# ---- analysis caches ----------------------------------------------------------------------


def test_damaged_analysis_cache_is_refused(tmp_path):
    from jsae.analysis.run import _load_cached
    from jsae.analysis.top import TopActivations

    F, n = 4, 3
    top = TopActivations(np.arange(F), np.ones((F, n), np.float32), np.zeros((F, n), np.int64),
                         np.zeros((F, n), np.int64), np.full(F, 0.1), np.full(F, 0.2), 100)
    f_top, f_ctx = tmp_path / "t.npz", tmp_path / "t.contexts.npy"
    top.save(f_top)
    np.save(f_ctx, np.ones((8, 16), np.int32))
    _load_cached(f_top, f_ctx, 8, 16)  # intact
    f_top.write_bytes(f_top.read_bytes()[:100])
    with pytest.raises(FileFormatError, match="t.npz is not a readable"):
        _load_cached(f_top, f_ctx, 8, 16)
    bad = TopActivations(np.arange(F), np.ones((F, n), np.float32), np.zeros((F, n + 1), np.int64),
                         np.zeros((F, n), np.int64), np.full(F, np.nan), np.full(F, 0.2), 100)
    bad.save(f_top)
    with pytest.raises(FileFormatError, match=r"t.npz: array 'context' has shape \[4, 4\]"):
        _load_cached(f_top, f_ctx, 8, 16)
    top.save(f_top)
    np.save(f_ctx, np.ones((8,), np.int32))
    with pytest.raises(FileFormatError, match="t.contexts.npy: the cached contexts has shape"):
        _load_cached(f_top, f_ctx, 8, 16)


def test_damaged_atlas_and_state_are_refused(tmp_path):
    from jsae.analysis.atlas.build import load_atlas
    from jsae.analysis.atlas.persist import load_state, save_state
    from jsae.analysis.atlas.state import StreamConfig, init_state
    from jsae.analysis.atlas.types import AtlasStateMismatch

    f = tmp_path / "atlas.npz"
    f.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(FileFormatError, match="atlas.npz is not a readable atlas"):
        load_atlas(f)
    tables = json.dumps({"meta": {}, "cluster_labels": [], "labels": [], "token_str": {}})
    with open(f, "wb") as fh:
        np.savez(fh, __tables__=np.frombuffer(tables.encode(), np.uint8))
    with pytest.raises(FileFormatError, match="atlas.npz: field 'cluster_labels'"):
        load_atlas(f)

    cfg = StreamConfig(top_k=2, window=4, bands=2, band_samples=1, hist_bins=4, coact_tokens=8,
                       coact_k=2)
    st = init_state(8, cfg)
    expect = {"sae": "s", "corpus": "c"}
    p = tmp_path / "h.state.npz"
    save_state(p, st.replace(max=np.zeros(5, np.float32)), {**expect, "next_context": 2})
    with pytest.raises(AtlasStateMismatch, match=r"array 'max' is float32 \[5\]"):
        load_state(p, expect, st, 10)
    save_state(p, st, {**expect, "next_context": 99})
    with pytest.raises(AtlasStateMismatch, match="'next_context'"):
        load_state(p, expect, st, 10)
    save_state(p, st, {**expect, "next_context": 4})
    assert load_state(p, expect, st, 10)[1]["next_context"] == 4


# ---- the real command line, in a fresh process ----------------------------------------------


def test_refusals_through_the_real_command_line(work):
    """A few of the cases above through `python -m jsae`: exit 2, one stderr line, no
    traceback, the file unchanged."""
    root, cfg, run, _ = work
    det = root / "det-sub.json"
    d = json.loads((root / "det.json").read_text())
    d["scale"] = [1.0]
    det.write_text(json.dumps(d))
    npy = root / "sub-rank3.npy"
    np.save(npy, np.zeros((2, 2, 2), np.float32))
    man = root / "cache-sub"
    man.mkdir()
    (man / "manifest.json").write_text("[1, 2")
    cases = [
        (["monitor", run, "--detector", det, "--text", "hi"], det, "'scale'"),
        (["train", cfg, "--run-dir", root / "sub-new", "--set", "data.source=array",
          "--set", f"data.path={npy}"], npy, "[N, d_in]"),
        (["train", cfg, "--run-dir", root / "sub-new", "--set", "data.source=cache",
          "--set", f"data.path={man}"], man / "manifest.json", "invalid JSON"),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for argv, f, needle in cases:
        before = tree_hash(f)
        p = subprocess.run([sys.executable, "-m", "jsae", *map(str, argv)], capture_output=True,
                           text=True, env=env, timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2, p.stderr[-2000:]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert lines[0].startswith(f"jsae {argv[0]}: ") and str(f) in lines[0], lines[0]
        assert needle in lines[0], lines[0]
        assert tree_hash(f) == before


def test_every_refusal_is_an_expected_error():
    """The classes raised above are JsaeErrors (the CLI's one-line exit 2), and ValueErrors
    (code that caught ValueError keeps working)."""
    for cls in (FileFormatError, BadInput):
        assert issubclass(cls, JsaeError) and issubclass(cls, ValueError)

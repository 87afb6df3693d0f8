"""Every speed figure and a real dictionary from one accelerator window: one command, one folder.

    python benchmarks/device_suite.py --out suite-h100            # one GPU or TPU host, ~8 min
    python benchmarks/device_suite.py --out suite --budget-s 900  # more time: more tokens in part 4
    python benchmarks/device_suite.py --out suite --parts 1,2     # some parts only
    python benchmarks/device_suite.py --small --out suite-cpu     # every part at toy size, CPU, minutes

Parts (each in its own Python process, so a crash, an out-of-memory or a hang in one is
recorded and the others still run; the GPU memory of one is freed before the next):

1. ``sae_step``: the training step at B 4096, d_in 768, d_sae 24576, k 32 in float32 and
   bfloat16 for TopK, BatchTopK, JumpReLU and Matryoshka: jsae's step against SAELens's
   (when importable; ``--saelens-python`` runs this part under another Python) and, for TopK, a
   plain PyTorch step (bf16 autocast in the bfloat16 rows), interleaved rounds
   (benchmarks/sae_step.py's ``compare``), ms/step, ratios and the dense-FLOP floor (12 B d_in
   d_sae FLOPs at the matmul rate measured on the device).
2. ``harvest``: Gemma 3 270M to ``blocks.6`` and ``blocks.17.hook_resid_post``, jsae against
   transformers on the same device, bfloat16 and float32 (benchmarks/harvest.py's ``measure``).
3. ``atlas_pass``: the atlas's streaming pass against a plain harvest of the same contexts, at the
   quickstart dictionary's shape (16 x d_model) and at 65,536 features (benchmarks/atlas.py).
4. ``dictionary``: a real dictionary. `jsae train` (jsae's runner, the config written to
   OUT/dictionary/config.yaml) harvests the offline corpus at a middle layer and trains a
   16,384-feature TopK dictionary on as many tokens as the part's budget allows (measured first,
   at most ``--dict-tokens``; the epochs over the corpus are reported), then `jsae eval`, `jsae
   atlas` (site in OUT/dictionary/site), the dictionary in float16 (OUT/dictionary/sae-fp16), and
   the median nearest-neighbour decoder cosine and cluster count next to the quickstart's.
5. ``attribution``: one attribution graph on Gemma 3 270M by ``jsae.circuits.attribute`` (when
   it exists) and by circuit-tracer (when installed; ``$JSAE_CIRCUIT_TRACER_PYTHON`` names a
   Python that has it), seconds and peak memory, on the same random transcoders.

The budget (``--budget-s``, default 480) is split into cumulative deadlines (``SHARES``): time a
part leaves unused goes to the next ones; a part past its deadline is stopped and recorded
``timeout``; parts measure as much as fits (part 1 skips combinations, part 4 sizes its token
count). Everything goes under ``--out``: results.json (every part's status, numbers, hardware,
versions and exact command), results.md (the tables), logs/part-N.log, and part 4's outputs.
Nothing is downloaded: the model (``--model``, default the offline GGUF package
``gemma-3-270m``) and the corpus (``--corpus``, default the offline Wikipedia + State of the Union
text) come from installed packages.

``--small``: every part at toy size on a CPU (a random Gemma 3 shaped like the 270M one, its
corpus and a 512-feature dictionary; benchmarks/toy.py) in a few minutes: what the tests and CI
run (tests/test_device_suite.py). Its figures are not measurements.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (the script's own folder)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OWNER = "benchmarks/device_suite.py"  # what jsae.outputs records as the writer of --out
PARTS = {1: "sae_step", 2: "harvest", 3: "atlas_pass", 4: "dictionary", 5: "attribution"}
# each part's share of the budget; deadlines are cumulative, so unused time carries forward
SHARES = {1: 0.17, 2: 0.10, 3: 0.07, 4: 0.56, 5: 0.10}
# --small: the budget is a guard against a hang, not a plan (its parts take ~10-60 s each)
SHARES_SMALL = {1: 0.2, 2: 0.15, 3: 0.15, 4: 0.35, 5: 0.15}
ARCHS = ("topk", "batchtopk", "jumprelu", "matryoshka")
# The quickstart dictionary's atlas (README, "What one real neighbourhood contains": 300k
# training tokens, 196,570 atlas tokens, layer 6, 10,240 features).
QUICKSTART = {"median_nn_cos": 0.20, "clusters": 148, "live": 8809, "d_sae": 10240,
              "train_tokens": 300_000}
PROMPT = "The Golden Gate Bridge is in the city of"


# ---- shared by the parent and the parts ----------------------------------------------------


def versions(python_packages=("jax", "jaxlib", "flax", "torch", "transformers", "sae_lens",
                              "circuit_tracer", "umap")) -> dict:
    """Versions of what the parts use (None: not importable here)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in python_packages:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["jsae_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["jsae_commit"] = None
    return out


def hardware() -> dict:
    """The machine: CPU, cores, memory, and the accelerators jax and torch see."""
    cpu = cpu_name()
    hw = {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}"}
    try:
        hw["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import jax

        devs = jax.devices()
        hw["jax_backend"] = jax.default_backend()
        hw["jax_devices"] = f"{len(devs)} x {devs[0].device_kind}"
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        hw["jax_backend"] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        hw["torch_cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    return hw


def describe(hw: dict) -> str:
    return (f"{hw.get('jax_devices', '?')} ({hw.get('jax_backend')}); torch cuda "
            f"{hw.get('torch_cuda')}; CPU {hw['cpu']} x{hw['cores']}"
            + (f", {hw['memory_gib']} GiB" if "memory_gib" in hw else ""))


def torch_beside_jax() -> str | None:
    """Why PyTorch peers cannot be compared with jax here (None: they run on the same kind of
    device): on a TPU host, or a GPU that torch does not see, they would run on the CPU."""
    import jax

    backend = jax.default_backend()
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    cuda = torch.cuda.is_available()
    if backend == "cpu" or (backend == "gpu" and cuda):
        return None
    return (f"jax runs on {backend} but torch {'sees a GPU' if cuda else 'has no GPU'}: a "
            "PyTorch peer would not run on the same device (a GPU-only comparison)")


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class Clock:
    """A part's deadline: ``left()`` seconds remain; ``checkpoint(results)`` records what the
    part has measured so far (kept if the part is stopped at its deadline)."""

    def __init__(self, budget_s: float, checkpoint=lambda results: None):
        self.t0, self.budget, self.checkpoint = time.perf_counter(), budget_s, checkpoint

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def say(clock: Clock, msg: str) -> None:
    print(f"[{clock.elapsed():7.1f} s] {msg}", flush=True)


# ---- part 1: the training step -------------------------------------------------------------


def part_sae_step(a, clock: Clock) -> dict:
    import jax

    sys.path.insert(0, str(BENCH))
    import sae_step

    B, d, F, k = (64, 16, 128, 4) if a.small else (4096, 768, 24576, 32)
    rounds, steps = (1, 1) if a.small else (5, 10)
    on_gpu = jax.default_backend() != "cpu"
    res = {"shape": {"batch": B, "d_in": d, "d_sae": F, "k": k}, "rounds": rounds,
           "steps_per_round": steps, "rows": [], "skipped": []}
    try:
        import sae_lens  # noqa: F401

        res["saelens"] = "importable"
    except ImportError as e:
        res["saelens"] = f"not importable here ({type(e).__name__}): peer skipped"
    if not on_gpu:
        res["note"] = ("no accelerator: every contender runs on the CPU (PyTorch peers without "
                       "autocast)")
    apart = torch_beside_jax()
    peers = ("saelens", "torch") if apart is None else ()
    if apart:
        res["peers_skipped"] = apart
        say(clock, f"PyTorch peers skipped: {apart}")
    longest = 0.0
    for dtype in ("float32", "bfloat16"):
        rate = sae_step.matmul_rate(dtype, n=256 if a.small else 4096)
        floor = 1e3 * 12 * B * d * F / rate
        say(clock, f"{dtype}: matmul rate {rate / 1e12:.2f} TFLOP/s; dense-FLOP floor "
                   f"{floor:.2f} ms/step")
        res.setdefault("matmul_tflops", {})[dtype] = rate / 1e12
        res.setdefault("dense_floor_ms", {})[dtype] = floor
        for arch in ARCHS if dtype == "float32" or not a.small else ARCHS[:1]:
            # (--small: bfloat16 for the first architecture only; each step compiles for seconds)
            if clock.left() < 1.5 * longest + 5:
                res["skipped"].append({"arch": arch, "dtype": dtype, "reason": "budget spent"})
                say(clock, f"{arch} {dtype}: skipped (budget spent)")
                continue
            t = time.perf_counter()
            r = sae_step.compare(arch, B, d, F, k, dtype, peers=peers,
                                 rounds=rounds, steps=steps, reference=False,
                                 saelens_sparse=False)
            longest = max(longest, time.perf_counter() - t)
            jsae_name = next(iter(r["ms"]))
            row = {"arch": arch, "dtype": dtype, "ms": r["ms"], "jsae": jsae_name,
                   "tokens_per_s": {n: B / (ms / 1e3) for n, ms in r["ms"].items()},
                   "ratios": r["ratios"], "unavailable": r["unavailable"],
                   "floor_ms": floor, "jsae_over_floor": r["ms"][jsae_name] / floor}
            res["rows"].append(row)
            clock.checkpoint(res)
            say(clock, f"{arch} {dtype}: jsae {r['ms'][jsae_name]:.2f} ms/step; ratios "
                       + (", ".join(f"{p} {x:.2f}x" for p, x in r["ratios"].items()) or "none"))
    return res


# ---- part 2: harvesting --------------------------------------------------------------------


def part_harvest(a, clock: Clock) -> dict:
    sys.path.insert(0, str(BENCH))
    import harvest

    import jsae.models as M

    n_layers = M.load(a.model_path).cfg.n_layers
    layers = sorted({min(6, n_layers - 1), min(17, n_layers - 1)})
    batch, seq, iters = (2, 32, 1) if a.small else (32, 256, 5)
    res = {"layers": layers, "batch": batch, "seq": seq, "iters": iters, "rows": []}
    apart = torch_beside_jax()
    if apart:
        res["transformers_skipped"] = apart
        say(clock, f"transformers skipped: {apart}")
    for dtype in ("bfloat16", "float32"):
        if clock.left() < 10:
            res.setdefault("skipped", []).append({"dtype": dtype, "reason": "budget spent"})
            continue
        r = harvest.measure(a.model_path, batch=batch, seq=seq, layers=layers, iters=iters,
                            dtype=dtype, modes=("harvest",), nnx=False, use_torch=apart is None)
        for name, impls in r["tok_s"].items():
            layer = int(name.split("L")[-1]) if "L" in name else layers[0]
            row = {"dtype": dtype, "layer": layer, "tok_s": impls}
            if "torch" in impls:
                row["ratio_jsae_over_transformers"] = impls["jax"] / impls["torch"]
            res["rows"].append(row)
        res.setdefault("max_diff", {})[dtype] = r["max_diff"]
        clock.checkpoint(res)
        say(clock, f"harvest {dtype} done")
    return res


# ---- part 3: the atlas pass ----------------------------------------------------------------


def part_atlas_pass(a, clock: Clock) -> dict:
    from types import SimpleNamespace

    import jax
    import numpy as np

    sys.path.insert(0, str(BENCH))
    import atlas as atlas_bench

    import jsae.models as M
    from jsae.sae import SAESpec, init_sae

    model = M.load(a.model_path, dtype="float32")  # the quickstart's dtype
    d = model.cfg.d_model
    layer = min(6, model.cfg.n_layers - 1)
    hook = f"blocks.{layer}.hook_resid_post"
    sizes = (16 * d, 4096) if a.small else (16 * d, 65536)
    tokens, ctx, batch, repeats = (2048, 32, 8, 1) if a.small else (65536, 128, 64, 3)
    res = {"hook": hook, "tokens": tokens, "context_length": ctx, "batch": batch, "rows": []}
    sample = np.random.default_rng(0).normal(size=(1024, d)).astype(np.float32)
    for F in sizes:
        if clock.left() < 10:
            res.setdefault("skipped", []).append({"d_sae": F, "reason": "budget spent"})
            continue
        # a random TopK dictionary: the pass's cost depends on the shape and k, not the training
        sae = init_sae(jax.random.key(0), SAESpec("topk", d, F, k=32), sample)
        r = atlas_bench.bench_pass(SimpleNamespace(model=model, sae=sae, hook=hook), tokens,
                                   ctx, batch, repeats)
        r["ratio_atlas_over_harvest"] = r["atlas_tok_s"] / r["harvest_tok_s"]
        res["rows"].append(r)
        clock.checkpoint(res)
        say(clock, f"{F} features: harvest {r['harvest_tok_s']:,.0f} tok/s, atlas pass "
                   f"{r['atlas_tok_s']:,.0f} tok/s (adds {r['atlas_overhead']:.0%})")
    return res


# ---- part 4: a real dictionary -------------------------------------------------------------


def _corpus_tokens(cfg) -> tuple[int, int]:
    """(training tokens of one epoch over the corpus, documents), as `jsae train` packs them
    (each document with its BOS; the held-out documents excluded)."""
    from jsae.data.packing import tokenizer_batch_fn
    from jsae.data.text import DocumentStream, open_documents
    from jsae.models import load

    tok = load(cfg.model.name).tokenizer
    stream = DocumentStream(open_documents(cfg.data), split="train",
                            holdout_fraction=cfg.data.holdout_fraction, seed=cfg.seed, epochs=1)
    encode = tokenizer_batch_fn(tok)
    total = n_docs = 0
    chunk: list[str] = []
    for doc in stream.iterate(0, 0):
        chunk.append(doc if isinstance(doc, str) else str(getattr(doc, "text", doc)))
        if len(chunk) == 512:
            total += sum(len(ids) + 1 for ids in encode(chunk))
            n_docs += len(chunk)
            chunk = []
    if chunk:
        total += sum(len(ids) + 1 for ids in encode(chunk))
        n_docs += len(chunk)
    return total, n_docs


def _dictionary_config(a, out: Path, tokens: int, layer: int) -> dict:
    """The run's config: the quickstart's, at the suite's shape and size."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    raw["run_dir"] = str(out / "run")
    raw["model"].update(name=a.model_path, hooks=[f"blocks.{layer}.hook_resid_post"],
                        dtype="float32" if a.small else "bfloat16",
                        batch_size=8 if a.small else 64)
    raw["data"]["shuffle_buffer"] = 16384 if a.small else 262144
    if a.corpus != "offline":
        raw["data"].update(dataset="files", path=a.corpus)
    raw["sae"].pop("expansion", None)
    raw["sae"].update(d_sae=a.dict_features, k=a.dict_k)
    if not a.small:
        raw["sae"]["dtype"] = "bfloat16"  # encoder matmul in bf16, fp32 params
    batch = 1024 if a.small else 4096
    steps = max(tokens // batch, 1)
    raw["train"].update(tokens=steps * batch, batch_size=batch, lr=a.dict_lr,
                        lr_warmup_steps=max(min(steps // 20, 1000), 1), log_every=max(steps // 50, 1),
                        progress=False)
    raw["checkpoint"] = {"enabled": False}
    raw["eval"] = {"tokens": 4096 if a.small else 65536, "show_features": 0}
    return raw


def _calibrate(cfg_path: Path, seconds: float, min_steps: int) -> dict:
    """Tokens/s of `jsae train`'s loop body (LM harvest + shuffle + step) on this machine: the
    same source and Trainer the run builds, timed after two warm-up steps."""
    import jax

    from jsae import config as C
    from jsae.data import make_source
    from jsae.train.loop import Trainer

    cfg = C.load(cfg_path)
    t = time.perf_counter()
    source = make_source(cfg, 0, 1)
    trainer = Trainer(cfg, source)
    states = trainer.init_states()
    for _ in range(2):
        states, m = trainer.step(states, source.next_batch(trainer.local_batch))
    jax.block_until_ready(m)
    setup = time.perf_counter() - t
    t, n = time.perf_counter(), 0
    while n < min_steps or time.perf_counter() - t < seconds:
        states, m = trainer.step(states, source.next_batch(trainer.local_batch))
        n += 1
        if n >= 10 * min_steps and time.perf_counter() - t >= seconds:
            break
    jax.block_until_ready(m)
    dt = time.perf_counter() - t
    return {"tokens_per_s": n * cfg.train.batch_size / dt, "steps": n, "seconds": dt,
            "setup_s": setup}


def part_dictionary(a, clock: Clock) -> dict:
    import numpy as np
    import yaml

    from jsae import config as C
    from jsae.cli import main as cli
    from jsae.models import load
    from jsae.runner import run_training
    from jsae.runs import sae_dirname
    from jsae.sae.io import load_sae, save_sae

    out = Path(a.out) / "dictionary"
    out.mkdir(parents=True, exist_ok=True)
    n_layers = load(a.model_path).cfg.n_layers
    layer = a.dict_layer if a.dict_layer is not None else n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    res = {"hook": hook, "d_sae": a.dict_features, "k": a.dict_k}

    # 1. how fast this machine trains, with the very config the run uses (tokens still unknown),
    # while another thread counts the corpus's tokens (for the epochs; tokenizers free the GIL)
    probe = out / "calibration-config.yaml"
    probe.write_text(yaml.safe_dump(_dictionary_config(a, out, 10**9, layer), sort_keys=False))
    counted: dict = {}
    probe_cfg = C.load(probe)  # here: the architecture registry is filled on first use, not in a thread
    counter = threading.Thread(target=lambda: counted.update(n=_corpus_tokens(probe_cfg)))
    counter.start()
    cal = _calibrate(probe, seconds=3 if a.small else min(20, 0.06 * clock.budget),
                     min_steps=3 if a.small else 20)
    counter.join()
    probe.unlink()
    res["calibration"] = cal
    say(clock, f"calibration: {cal['tokens_per_s']:,.0f} tokens/s ({cal['steps']} steps in "
               f"{cal['seconds']:.1f} s, setup {cal['setup_s']:.1f} s)")
    if "n" not in counted:
        raise RuntimeError("counting the corpus's tokens failed (see the log above)")
    corpus, docs = counted["n"]
    res.update(corpus_train_tokens=corpus, corpus_train_documents=docs)
    say(clock, f"the corpus: {corpus:,} training tokens in {docs:,} documents")

    # 2. as many tokens as the budget allows, after the run's own setup (model load, compile,
    # held-out eval) and `jsae eval`, `jsae atlas` (UMAP of 16k points, the site) and the saves
    reserve = 0.45 * clock.budget + 2 * cal["setup_s"]
    train_s = max(clock.left() - reserve, 1.0)
    fit = int(cal["tokens_per_s"] * train_s * 0.9)
    tokens = max(min(a.dict_tokens, fit), 20 * (1024 if a.small else 4096))
    raw = _dictionary_config(a, out, tokens, layer)
    cfg_file = out / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = C.load(cfg_file)
    res.update(config=str(cfg_file), train_tokens=cfg.train.tokens, token_target=a.dict_tokens,
               limited_by="budget" if fit < a.dict_tokens else "--dict-tokens")
    res["epochs"] = cfg.train.tokens / corpus
    clock.checkpoint(res)
    say(clock, f"training on {cfg.train.tokens:,} tokens ({res['limited_by']} limit) = "
               f"{res['epochs']:.2f} epochs over the corpus's {corpus:,} training tokens "
               f"({docs:,} documents); config {cfg_file}")

    # 3. jsae train
    t = time.perf_counter()
    summary = run_training(cfg, print_fn=lambda m: print(m, flush=True))
    res["train_s"] = time.perf_counter() - t
    res["train_tokens_per_s"] = cfg.train.tokens / res["train_s"]
    res["heldout"] = summary.get("heldout", {}).get(hook)
    clock.checkpoint(res)
    say(clock, f"trained in {res['train_s']:.0f} s ({res['train_tokens_per_s']:,.0f} tok/s "
               "end to end)")

    # 4. jsae eval (reconstruction, spliced CE / KL)
    run = Path(cfg.run_dir)
    t = time.perf_counter()
    ev = ["eval", str(run), "--tokens", "4096" if a.small else "65536", "--downstream-tokens",
          "512" if a.small else "16384"]
    if cli(ev):
        raise RuntimeError(f"jsae {' '.join(ev)} failed")
    doc = json.loads((run / "eval" / "eval.json").read_text())
    res["eval"] = doc["metrics"][hook]
    res["eval_s"] = time.perf_counter() - t
    clock.checkpoint(res)
    say(clock, f"eval: FVU {res['eval']['fvu']:.4f}, L0 {res['eval']['l0']:.1f}, CE recovered "
               f"{res['eval'].get('ce_recovered_zero', float('nan')):.4f} ({res['eval_s']:.0f} s)")

    # 5. the atlas and its site
    site = out / "site"
    # auto: UMAP when installed (the quickstart's clusters are UMAP's); --small: PCA (UMAP's
    # numba compilation alone takes 30-60 s)
    map_method = a.map if a.map != "auto" else ("umap" if _has("umap") and not a.small else "pca")
    t = time.perf_counter()
    at = ["atlas", str(run), "--out", str(site), "--tokens", "4096" if a.small else "200000",
          "--map", map_method, "--top-k", "8" if a.small else "12", "--band-samples", "2",
          "--context-length", "32" if a.small else "128"]
    if cli(at):
        raise RuntimeError(f"jsae {' '.join(at)} failed")
    from jsae.analysis.atlas.build import load_atlas
    from jsae.analysis.atlas.structure import structure

    data = load_atlas(site / "atlas.npz")
    st = structure(data)
    res["atlas"] = {"seconds": time.perf_counter() - t, "tokens": int(data.meta["n_tokens"]),
                    "live": st["live"], "clusters": st["clusters"],
                    "content_clusters": st["content_clusters"],
                    "median_nn_cos": st["median_nn_cos"], "map": map_method,
                    # without state/ (the pass's resumable state, not needed to view the site)
                    "site_mb": _mb(site, skip="state")}
    clock.checkpoint(res)
    say(clock, f"atlas: {res['atlas']['live']} of {a.dict_features} features fired, "
               f"{res['atlas']['clusters']} clusters ({map_method}), site {res['atlas']['site_mb']:.1f} MB")

    # 6. the dictionary in float16, checked by loading it back
    sae, meta = load_sae(run / "saes" / sae_dirname(hook))
    fp16 = out / "sae-fp16"
    save_sae(sae, fp16, {**meta, "stored_as": "float16", "trained_tokens": cfg.train.tokens},
             owner=OWNER, dtype="float16")
    back, _ = load_sae(fp16)
    w16 = np.asarray(back.params["W_dec"], np.float32)
    res["fp16"] = {"path": str(fp16), "mb": _mb(fp16),
                   "max_abs_diff_W_dec": float(np.abs(w16 - np.asarray(sae.params["W_dec"])).max())}
    res["quickstart"] = QUICKSTART
    q = res["atlas"]
    say(clock, f"median nearest-neighbour decoder cosine {q['median_nn_cos']:.3f} (quickstart "
               f"{QUICKSTART['median_nn_cos']:.2f}); clusters {q['clusters']} (quickstart "
               f"{QUICKSTART['clusters']}); live {q['live']} of {a.dict_features} (quickstart "
               f"{QUICKSTART['live']} of {QUICKSTART['d_sae']}); trained on "
               f"{cfg.train.tokens:,} tokens (quickstart {QUICKSTART['train_tokens']:,})")
    return res


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _mb(path: Path, skip: str | None = None) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*")
               if f.is_file() and (skip is None or skip not in f.relative_to(path).parts)) / 2**20


# ---- part 5: attribution graphs ------------------------------------------------------------

_CT_SCRIPT = r"""
import json, resource, sys, time
import torch
from circuit_tracer import attribute
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
hf_dir, ct_dir, prompt, n_feat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
t = time.perf_counter()
from pathlib import Path
tc, _ = load_transcoder_from_hub(Path(ct_dir).name, cache_dir=str(Path(ct_dir).parent), device=dev,
                                 dtype=torch.float32)
# Gemma 3 through nnsight: the MLP's (normalised) input and output, as /work/shared's CPU figure
tc.feature_input_hook, tc.feature_output_hook = "mlp.hook_in", "hook_mlp_out"
model = ReplacementModel.from_pretrained_and_transcoders(hf_dir, tc, backend="nnsight", device=dev,
                                                         dtype=torch.float32)
load_s = time.perf_counter() - t
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
graph = attribute(prompt, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=256,
                  max_feature_nodes=n_feat, verbose=False)
sec = time.perf_counter() - t
out = {"seconds": sec, "load_s": load_s, "active_features": int(graph.active_features.shape[0]),
       "selected_features": int(len(graph.selected_features)), "n_pos": int(graph.input_tokens.shape[0]),
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "device": str(dev)}
if dev.type == "cuda":
    out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def random_transcoders(model, n: int, active: int, seed: int = 0, ids=None):
    """One random JumpReLU transcoder per layer (MLP input -> MLP output), as circuit-tracer's
    CPU figure in /work/shared used: speed depends on the shapes and the active count, so each
    layer's threshold is set from the prompt's own MLP inputs to let about ``active`` of its
    ``n`` features fire per token (trained transcoders' L0). ``ids [T]``: the prompt's tokens
    (default PROMPT's)."""
    import jax.numpy as jnp
    import numpy as np

    from jsae.models.transformer import forward
    from jsae.sae import SAE, SAESpec

    d, L = model.cfg.d_model, model.cfg.n_layers
    rng = np.random.default_rng(seed)
    # the MLP's normalised input, the hook circuit-tracer's side reads (_CT_SCRIPT): both sides
    # must run the same transcoders on the same activations (with hook_resid_mid here, jsae
    # attributed 1,017 active features where circuit-tracer saw 26)
    hooks = tuple(f"blocks.{i}.mlp.hook_in" for i in range(L))
    ids = jnp.asarray([model.tokenizer.encode(PROMPT)] if ids is None else [list(ids)])
    acts = forward(model.cfg, model.params, ids, capture=hooks).activations
    out = []
    for i in range(L):
        w_enc = rng.standard_normal((d, n)) / np.sqrt(d)
        pre = np.asarray(acts[hooks[i]][0, 1:], np.float64) @ w_enc  # BOS has no features
        theta = np.maximum(np.quantile(pre, 1.0 - active / n, axis=0), 1e-3)
        p = {"W_enc": w_enc, "W_dec": rng.standard_normal((n, d)) / np.sqrt(n),
             "b_enc": np.zeros(n), "b_dec": np.zeros(d), "log_threshold": np.log(theta)}
        sae = SAE(params={k: jnp.asarray(v, jnp.float32) for k, v in p.items()},
                  norm_scale=jnp.asarray(1.0, jnp.float32),
                  spec=SAESpec("jumprelu_transcoder", d, n))
        out.append((hooks[i], f"blocks.{i}.hook_mlp_out", sae))
    return out


def hf_folder(model_path: str, work: Path, ct_python: str) -> str:
    """An HF folder of the model for circuit-tracer: the folder itself, or the GGUF converted
    by transformers (under circuit-tracer's Python) into ``work``."""
    if Path(model_path).is_dir() and (Path(model_path) / "config.json").is_file():
        return model_path
    gguf = model_path
    if not model_path.endswith(".gguf"):
        import importlib

        from jsae.models.loading import OFFLINE_MODELS

        gguf = str(importlib.import_module(OFFLINE_MODELS[model_path]).assemble())
    script = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
              "from pathlib import Path; p = Path(sys.argv[1]); "
              "m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name); "
              "m.save_pretrained(sys.argv[2]); "
              "AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(sys.argv[2])")
    dst = work / "hf-model"
    subprocess.run([ct_python, "-c", script, gguf, str(dst)], check=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return str(dst)


def part_attribution(a, clock: Clock) -> dict:
    from jsae.export import gather, save_circuit_tracer
    from jsae.models import load

    work = Path(a.out) / "attribution"
    work.mkdir(parents=True, exist_ok=True)
    model = load(a.model_path)
    n, active = (64, 2) if a.small else (4096, 64)
    tcs = random_transcoders(model, n, active)
    ct_dir = work / "transcoders"
    save_circuit_tracer(gather(tcs, str(model.name)), ct_dir, owner=OWNER)
    res = {"prompt": PROMPT, "features_per_layer": n, "active_per_token": active, "layers": model.cfg.n_layers,
           "transcoders": str(ct_dir)}

    # jsae: the first call compiles; the second is the warm time
    try:
        from jsae.circuits import attribute
    except ImportError:
        res["jsae"] = {"status": "skipped: not available (jsae.circuits.attribute does not "
                                 "exist in this version)"}
    else:
        import jax

        try:
            t = time.perf_counter()
            attribute(model, str(ct_dir), PROMPT)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            graph = attribute(model, str(ct_dir), PROMPT)  # NumPy arrays: finished on return
            res["jsae"] = {"status": "ok", "seconds": time.perf_counter() - t, "seconds_cold": cold,
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "active_features": int(graph.n_features)}
            try:
                stats = jax.devices()[0].memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    res["jsae"]["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
            except Exception:  # noqa: BLE001 - CPU devices have no memory stats
                pass
        except Exception as e:  # noqa: BLE001 - recorded; circuit-tracer still runs
            res["jsae"] = {"status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
    say(clock, f"jsae: {res['jsae']['status']}")

    # circuit-tracer, under its own Python when $JSAE_CIRCUIT_TRACER_PYTHON names one
    ct_python = os.environ.get("JSAE_CIRCUIT_TRACER_PYTHON") or (sys.executable if _has("circuit_tracer") else None)
    if not ct_python:
        res["circuit_tracer"] = {"status": "skipped: circuit-tracer is not installed (set "
                                           "JSAE_CIRCUIT_TRACER_PYTHON to a Python that has it)"}
    elif clock.left() < 20:
        res["circuit_tracer"] = {"status": "skipped: budget spent"}
    else:
        try:
            hf_dir = hf_folder(a.model_path, work, ct_python)
            r = subprocess.run([ct_python, "-c", _CT_SCRIPT, hf_dir, str(ct_dir), PROMPT, str(2000)],
                               capture_output=True, text=True, timeout=max(clock.left() - 5, 10),
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode:
                raise RuntimeError(r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip()
                                   else f"exit code {r.returncode}")
            res["circuit_tracer"] = {"status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}
        except Exception as e:  # noqa: BLE001 - recorded
            res["circuit_tracer"] = {"status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
    say(clock, f"circuit-tracer: {res['circuit_tracer']['status']}")
    j, c = res["jsae"], res["circuit_tracer"]
    if j.get("status") == "ok" and c.get("status") == "ok":
        res["ratio_circuit_tracer_over_jsae_seconds"] = c["seconds"] / j["seconds"]
    return res


RUNNERS = {1: part_sae_step, 2: part_harvest, 3: part_atlas_pass, 4: part_dictionary,
           5: part_attribution}


# ---- one part, in its own process ----------------------------------------------------------


def worker(a) -> int:
    """Run part ``a.worker``; write OUT/parts/part-N.json whatever happens."""
    n = a.worker
    doc = {"part": n, "name": PARTS[n], "command": " ".join([sys.executable, *sys.argv]),
           "budget_s": a.part_budget_s}
    f = Path(a.out) / "parts" / f"part-{n}.json"
    f.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(results: dict) -> None:  # what is measured so far, in case of a stop
        f.write_text(json.dumps({**doc, "results": results, "status": "running"}, indent=1,
                                default=str))

    clock = Clock(a.part_budget_s, checkpoint)
    print(f"part {n} ({PARTS[n]}): python {platform.python_version()} at {sys.executable}", flush=True)
    doc["hardware"] = hardware()
    doc["versions"] = versions()
    print(f"hardware: {describe(doc['hardware'])}", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v), flush=True)
    print(f"command: {doc['command']}", flush=True)
    try:
        doc["results"] = RUNNERS[n](a, clock)
        doc["status"] = "ok"
        skipped = [x for x in ("skipped",) if doc["results"].get(x)]
        if skipped:
            doc["status"] = "partial"
            doc["reason"] = "budget spent before every combination ran"
    except Exception as e:  # noqa: BLE001 - recorded; the suite goes on
        import traceback

        traceback.print_exc()
        doc["status"], doc["reason"] = "failed", f"{type(e).__name__}: {str(e)[:500]}"
    doc["seconds"] = clock.elapsed()
    f.write_text(json.dumps(doc, indent=1, default=str))
    return 0


# ---- the suite -----------------------------------------------------------------------------


def _stream(proc, log_file: Path, t0: float, n: int) -> None:
    with open(log_file, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            print(f"  {n}| {line}", end="", flush=True)


def run_part(a, n: int, budget: float, out: Path, python: str, t0: float) -> dict:
    """Start part ``n`` as ``python device_suite.py --worker n``; stop it at its deadline."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", str(n), "--part-budget-s",
           f"{budget:.1f}", *a.forward]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           # jax and torch share the GPU within a part: jax must not take 75% of it up front
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    if a.small:
        env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    log_file = out / "logs" / f"part-{n}.log"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    reader = threading.Thread(target=_stream, args=(proc, log_file, t0, n), daemon=True)
    reader.start()
    grace = max(20.0, 0.1 * budget)  # a part past this is stuck, not slow
    try:
        rc = proc.wait(timeout=budget + grace)
        timed_out = False
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group (started above)
        rc, timed_out = proc.wait(), True
    reader.join(timeout=10)
    f = out / "parts" / f"part-{n}.json"
    doc = json.loads(f.read_text()) if f.exists() else {"part": n, "name": PARTS[n]}
    doc["wall_s"] = time.perf_counter() - start
    doc["log"] = str(log_file.relative_to(out))
    doc.setdefault("command", " ".join(cmd))
    if timed_out:
        doc["status"], doc["reason"] = "timeout", (
            f"stopped at its deadline ({budget:.0f} s + {grace:.0f} s)"
            + ("; results: what it measured before" if doc.get("results") else ""))
    elif doc.get("status", "running") == "running":
        doc["status"], doc["reason"] = "failed", f"the part's process exited with code {rc} " \
                                                 "before writing its result (see its log)"
    return doc


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="a new or empty folder for everything")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total seconds for every part (default 480; --small: 600, a guard: it "
                         "takes about 3 minutes)")
    ap.add_argument("--parts", default="1,2,3,4,5", help="which parts, e.g. 1,2,4")
    ap.add_argument("--small", "--smoke", action="store_true",
                    help="toy sizes on a CPU, minutes: what the tests run (not a measurement; "
                         "--smoke is the name every other benchmark gives this)")
    ap.add_argument("--model", default="gemma-3-270m",
                    help="offline model name (the GGUF package), a .gguf or an HF folder")
    ap.add_argument("--corpus", default="offline",
                    help="'offline' (Wikipedia summaries + State of the Union) or .txt/.jsonl files")
    ap.add_argument("--dict-tokens", type=int, default=None,
                    help="part 4: at most this many training tokens (default 150M; the budget "
                         "decides below that)")
    ap.add_argument("--dict-features", type=int, default=None, help="part 4: d_sae (default 16384)")
    ap.add_argument("--dict-k", type=int, default=None, help="part 4: TopK k (default 32)")
    ap.add_argument("--dict-layer", type=int, default=None,
                    help="part 4: the layer (default: the middle one, n_layers // 2)")
    ap.add_argument("--dict-lr", type=float, default=None, help="part 4: learning rate")
    ap.add_argument("--map", choices=["auto", "umap", "pca"], default="auto",
                    help="part 4's atlas map (auto: UMAP when installed)")
    ap.add_argument("--saelens-python", default=os.environ.get("JSAE_SAELENS_PYTHON"),
                    help="run part 1 under this Python (one with sae-lens; default "
                         "$JSAE_SAELENS_PYTHON, else this one)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    small = a.small
    for key, full, toy in (("budget_s", 480.0, 600.0), ("dict_tokens", 150_000_000, 250_000),
                           ("dict_features", 16384, 512), ("dict_k", 32, 16),
                           ("dict_lr", 5e-4, 1e-3)):
        if getattr(a, key) is None:
            setattr(a, key, toy if small else full)
    return a


def _md_table(rows: list[list], head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def _f(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def markdown(doc: dict) -> str:
    s = doc["suite"]
    lines = [f"# device suite, {s['date']}", "", f"Hardware: {describe(s['hardware'])}", "",
             f"Command: `{s['command']}`", "", f"Budget {s['budget_s']:.0f} s, took "
             f"{s['seconds']:.0f} s{' (--small: toy sizes, not measurements)' if s['small'] else ''}.",
             "", "## Parts", ""]
    lines += _md_table([[n, p["name"], p["status"], _f(p.get("wall_s"), "{:.0f} s"),
                         p.get("reason", "")] for n, p in doc["parts"].items()],
                       ["part", "name", "status", "time", "why"])
    p1 = doc["parts"].get("1", {}).get("results")
    if p1 and p1.get("rows"):
        sh = p1["shape"]
        lines += ["", f"## 1. Training step (B {sh['batch']}, d_in {sh['d_in']}, d_sae "
                      f"{sh['d_sae']}, k {sh['k']}; ms/step, median of interleaved rounds)", ""]
        lines += _md_table([[r["arch"], r["dtype"], _f(r["ms"][r["jsae"]]),
                             _f(r["ms"].get("saelens")), _f(r["ms"].get("torch-topk-embbag")),
                             _f(r["ratios"].get("saelens"), "{:.2f}x"),
                             _f(r["ratios"].get("torch-topk-embbag"), "{:.2f}x"),
                             _f(r["floor_ms"]), _f(r["jsae_over_floor"], "{:.1f}x")]
                            for r in p1["rows"]],
                           ["arch", "dtype", "jsae", "SAELens", "torch TopK", "SAELens / jsae",
                            "torch / jsae", "dense-FLOP floor", "jsae / floor"])
    p2 = doc["parts"].get("2", {}).get("results")
    if p2 and p2.get("rows"):
        lines += ["", f"## 2. Harvest (batch {p2['batch']} x {p2['seq']}; tokens/s)", ""]
        lines += _md_table([[r["dtype"], r["layer"], _f(r["tok_s"].get("jax"), "{:,.0f}"),
                             _f(r["tok_s"].get("torch"), "{:,.0f}"),
                             _f(r.get("ratio_jsae_over_transformers"), "{:.2f}x")]
                            for r in p2["rows"]],
                           ["dtype", "layer", "jsae", "transformers", "jsae / transformers"])
    p3 = doc["parts"].get("3", {}).get("results")
    if p3 and p3.get("rows"):
        lines += ["", f"## 3. Atlas pass vs plain harvest ({p3['hook']}; tokens/s)", ""]
        lines += _md_table([[r["d_sae"], _f(r["harvest_tok_s"], "{:,.0f}"),
                             _f(r["atlas_tok_s"], "{:,.0f}"), _f(r["atlas_overhead"], "{:.0%}")]
                            for r in p3["rows"]],
                           ["features", "harvest", "atlas pass", "the pass adds"])
    p4 = doc["parts"].get("4", {}).get("results")
    if p4 and p4.get("atlas"):
        q, at, ev = p4["quickstart"], p4["atlas"], p4.get("eval", {})
        lines += ["", f"## 4. A real dictionary ({p4['hook']}, {p4['d_sae']} features, TopK "
                      f"k {p4['k']})", "",
                  f"Trained on {p4['train_tokens']:,} tokens = {p4['epochs']:.2f} epochs over "
                  f"the corpus's {p4['corpus_train_tokens']:,} training tokens, "
                  f"{_f(p4.get('train_tokens_per_s'), '{:,.0f}')} tok/s end to end. Held-out FVU "
                  f"{_f(ev.get('fvu'), '{:.4f}')}, L0 {_f(ev.get('l0'), '{:.1f}')}, CE loss "
                  f"recovered {_f(ev.get('ce_recovered_zero'), '{:.4f}')}.", ""]
        lines += _md_table([["this run", f"{p4['train_tokens']:,}", _f(at["median_nn_cos"], "{:.3f}"),
                             at["clusters"], f"{at['live']} of {p4['d_sae']}"],
                            ["quickstart", f"{q['train_tokens']:,}", _f(q["median_nn_cos"]),
                             q["clusters"], f"{q['live']} of {q['d_sae']}"]],
                           ["dictionary", "training tokens", "median nearest-neighbour decoder "
                            "cosine", "clusters", "live features"])
    p5 = doc["parts"].get("5", {}).get("results")
    if p5:
        lines += ["", f"## 5. Attribution graph ({p5['layers']} layers x {p5['features_per_layer']} "
                      f"random transcoder features; prompt {p5['prompt']!r})", ""]
        lines += _md_table([[who, p5[key].get("status"), _f(p5[key].get("seconds")),
                             _f(p5[key].get("peak_rss_mb"), "{:,.0f}"),
                             _f(p5[key].get("peak_gpu_mb", p5[key].get("peak_device_mb")), "{:,.0f}")]
                            for who, key in (("jsae", "jsae"), ("circuit-tracer", "circuit_tracer"))],
                           ["", "status", "seconds", "peak RSS MB", "peak device MB"])
    return "\n".join(lines) + "\n"


def check(doc: dict) -> list[str]:
    """Numbers that should be positive and finite but are not (empty when all are)."""
    bad = []

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, float) and not math.isfinite(x):
            bad.append(path)
    walk(doc, "")
    return bad


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker is not None:
        return worker(a)
    from jsae import outputs
    from jsae.errors import OutputRefused

    out = Path(a.out)
    try:
        outputs.claim_folder(out, OWNER)
        if out.is_dir() and any(out.iterdir()):  # even its own older results: a fresh folder
            raise OutputRefused(f"{out} is not empty; the suite writes a new or empty folder: "
                                "choose another --out")
    except OutputRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wanted = sorted({int(p) for p in a.parts.split(",") if p.strip()})
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        print(f"error: --parts: unknown part(s) {unknown}; known: {sorted(PARTS)}", file=sys.stderr)
        return 2
    (out / "logs").mkdir(parents=True, exist_ok=True)
    outputs.record(out, OWNER, ["results.json", "results.md", "logs/", "parts/", "dictionary/",
                                "attribution/", "toy/"])
    t0 = time.perf_counter()
    model_path = a.model
    if a.small and a.model == "gemma-3-270m":  # the toy model and corpus, made here
        sys.path.insert(0, str(BENCH))
        import toy

        model_path = str(toy.write_model(out / "toy" / "model"))
        if a.corpus == "offline":
            a.corpus = str(toy.write_corpus(out / "toy" / "corpus.jsonl", n_docs=1500))
    a.forward = ["--out", str(out), "--model-path", model_path, "--corpus", a.corpus,
                 "--dict-tokens", str(a.dict_tokens), "--dict-features", str(a.dict_features),
                 "--dict-k", str(a.dict_k), "--dict-lr", str(a.dict_lr), "--map", a.map,
                 *(["--dict-layer", str(a.dict_layer)] if a.dict_layer is not None else []),
                 *(["--small"] if a.small else [])]
    suite = {"command": " ".join(["python", *sys.argv]), "small": a.small, "budget_s": a.budget_s,
             "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             "hardware": hardware(), "versions": versions(), "model": a.model, "corpus": a.corpus}
    print(f"device suite: {describe(suite['hardware'])}", flush=True)
    print(f"command: {suite['command']}; budget {a.budget_s:.0f} s; out {out}", flush=True)
    shares = SHARES_SMALL if a.small else SHARES
    share = sum(shares[n] for n in wanted)
    deadline = 0.0
    doc = {"suite": suite, "parts": {}}
    for n in PARTS:
        if n not in wanted:
            doc["parts"][str(n)] = {"part": n, "name": PARTS[n], "status": "skipped",
                                    "reason": "not in --parts"}
            continue
        deadline += a.budget_s * shares[n] / share
        budget = deadline - (time.perf_counter() - t0)
        el = time.perf_counter() - t0
        if budget < 15:
            doc["parts"][str(n)] = {"part": n, "name": PARTS[n], "status": "skipped",
                                    "reason": f"budget spent ({budget:.0f} s left for it)"}
            print(f"[{el:7.1f} s] part {n} ({PARTS[n]}): skipped, budget spent", flush=True)
            continue
        python = (a.saelens_python or sys.executable) if n == 1 else sys.executable
        print(f"[{el:7.1f} s] part {n} ({PARTS[n]}): start, {budget:.0f} s budget", flush=True)
        p = run_part(a, n, budget, out, python, t0)
        doc["parts"][str(n)] = p
        print(f"[{time.perf_counter() - t0:7.1f} s] part {n} ({PARTS[n]}): {p['status']} in "
              f"{p['wall_s']:.1f} s" + (f" ({p['reason']})" if p.get("reason") else ""), flush=True)
        suite["seconds"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))  # after each part
    suite["seconds"] = time.perf_counter() - t0
    suite["non_finite"] = check(doc)
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "results.md").write_text(markdown(doc))
    print(markdown(doc), flush=True)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and the logs in {out / 'logs'} "
          f"({suite['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of an attribution graph against prompt length: jsae and circuit-tracer side by side.

    python benchmarks/attribution_memory.py                         # toy Gemma 3, CPU, minutes
    python benchmarks/attribution_memory.py --lengths 16,64,256 --json mem.json
    python benchmarks/attribution_memory.py --model gemma-3-270m --lengths 32,128,512
    python benchmarks/attribution_memory.py --smoke                 # tiny lengths (CI)

For each prompt length, the same random JumpReLU transcoders (one per layer, MLP input -> MLP
output, about ``--active`` features firing per token: benchmarks/device_suite.py's part 5, in
circuit-tracer's format, which both sides read) attribute a prefix of one token sequence by
``jsae.circuits.attribute`` and by circuit-tracer's ``attribute`` (every active feature:
``max_feature_nodes=None``; the same ``--batch-size`` target rows per step on both sides; its
nnsight backend under ``$JSAE_CIRCUIT_TRACER_PYTHON``, or this Python if it has circuit-tracer).
Each measurement runs in its own process: the model and transcoders are loaded first, then the
resident high-water mark is reset (Linux ``/proc/self/clear_refs``) and read after the
attribution (VmHWM; elsewhere ``ru_maxrss``, which includes loading). On a GPU the device's
peak bytes too (jax ``memory_stats()['peak_bytes_in_use']``, torch ``max_memory_allocated``).
Reported per side: the peak resident set during attribution, the growth over the loaded
process (peak - resident before) and seconds, for each of ``--repeat`` calls (default 2: the
first pays jsae's compilation, and XLA's compiler memory shows in its peak; the second is warm;
the ratios are the last call's), and for jsae its own plan
(`jsae.circuits.attribution.memory_plan`: XLA's analysis of the row step plus the host rows
and dense adjacency) next to what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from machine import cpu_name, load_avg, print_header  # benchmarks/ (the script's own folder)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# run first in both sides' processes: the same way of reading memory for jsae and circuit-tracer
_MEASURE = r'''
import json, resource, sys, time


def _status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def reset_peak():
    """Start the resident high-water mark afresh (Linux's clear_refs 5); False where not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb():
    return _status_mb("VmRSS")


def peak_mb():
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
'''

_JSAE = _MEASURE + r'''
import numpy as np
import jax
from jsae.circuits import attribute
from jsae.circuits import dictionaries as dicts
from jsae.circuits.attribution import memory_plan
from jsae.models import load

model_path, ct_dir, tok_file, batch, repeat = sys.argv[1:6]
model = load(model_path)
dic = dicts.from_path(ct_dir, model_cfg=model.cfg)
tokens = np.load(tok_file)
base = rss_mb()
calls = []
for _ in range(int(repeat)):
    before, exact = rss_mb(), reset_peak()
    t = time.perf_counter()
    g = attribute(model, dic, tokens, batch_size=int(batch))
    calls.append({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_mb(),
                  "rss_before_mb": before})
out = {"calls": calls, "active_features": int(g.n_features), "n_pos": int(len(g.tokens)),
       "n_nodes": int(g.adjacency.shape[0]), "base_rss_mb": base, "peak_exact": exact,
       "device": str(jax.devices()[0].platform)}
try:
    stats = jax.devices()[0].memory_stats() or {}
except Exception:  # CPU devices have none
    stats = {}
if "peak_bytes_in_use" in stats:  # the process's (jax has no reset): weights included
    out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
plan = memory_plan(model, dic, tokens, batch_size=int(batch))
out["plan"] = plan
print(json.dumps(out))
'''

_CT = _MEASURE + r'''
from pathlib import Path
import numpy as np
import torch
from circuit_tracer import attribute
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

hf_dir, ct_dir, tok_file, batch, repeat = sys.argv[1:6]
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tc, _ = load_transcoder_from_hub(Path(ct_dir).name, cache_dir=str(Path(ct_dir).parent), device=dev,
                                 dtype=torch.float32)
# Gemma 3 through nnsight: the MLP's (normalised) input and output, what jsae's side reads
tc.feature_input_hook, tc.feature_output_hook = "mlp.hook_in", "hook_mlp_out"
model = ReplacementModel.from_pretrained_and_transcoders(hf_dir, tc, backend="nnsight", device=dev,
                                                         dtype=torch.float32)
tokens = torch.from_numpy(np.load(tok_file).astype(np.int64))
base = rss_mb()
calls = []
for _ in range(int(repeat)):
    before, exact = rss_mb(), reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    g = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95,
                  batch_size=int(batch), max_feature_nodes=None, verbose=False)
    calls.append({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_mb(),
                  "rss_before_mb": before})
    if dev.type == "cuda":
        calls[-1]["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
out = {"calls": calls, "active_features": int(g.active_features.shape[0]),
       "n_pos": int(g.input_tokens.shape[0]), "n_nodes": int(g.adjacency_matrix.shape[0]),
       "base_rss_mb": base, "peak_exact": exact, "device": dev.type}
print(json.dumps(out))
'''


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy",
                   help="toy (a random Gemma 3 shaped like the 270M one; benchmarks/toy.py) or a "
                        "model jsae loads (gemma-3-270m, an HF folder)")
    p.add_argument("--lengths", default="16,32,64,128,256",
                   help="prompt lengths in tokens, BOS included (comma-separated)")
    p.add_argument("--features", type=int, default=None,
                   help="features per layer (default 128 on the toy model, 4096 otherwise)")
    p.add_argument("--active", type=int, default=None,
                   help="features firing per token and layer (default 2 on the toy, 4 otherwise)")
    p.add_argument("--batch-size", type=int, default=64, help="target rows per step, both sides")
    p.add_argument("--repeat", type=int, default=2,
                   help="attributions per process, each measured alone (the first pays jsae's "
                        "compilation; the last is warm)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--no-circuit-tracer", action="store_true", help="jsae alone")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
    p.add_argument("--smoke", action="store_true",
                   help="the toy model at lengths 8 and 16 (CI): it runs; figures mean little")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.lengths, a.repeat = "toy", "8,16", 1
    try:
        a.lengths = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
    except ValueError:
        p.error(f"--lengths: comma-separated whole numbers; got {a.lengths!r}")
    if not a.lengths or a.lengths[0] < 2:
        p.error("--lengths: each at least 2 (BOS and one token)")
    toy = a.model == "toy"
    a.features = a.features or (128 if toy else 4096)
    a.active = a.active or (2 if toy else 4)
    return a


def _tokens(model, n: int) -> np.ndarray:
    """``[n]`` token ids, BOS first, of random words (benchmarks/toy.py's), ``n`` at most the
    model's context."""
    from toy import WORDS

    rng = np.random.default_rng(0)
    ids: list[int] = []
    while len(ids) < n:
        text = " ".join(rng.choice(WORDS, size=4 * n)).capitalize() + "."
        ids = list(model.tokenizer.encode(text, add_bos=True))
    return np.asarray(ids[:n], np.int32)


def _child(python: str, script: str, args: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        r = subprocess.run([python, "-c", script, *args], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if r.returncode:
        last = r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else ""
        return {"status": f"failed (exit {r.returncode}): {last}"}
    return {"status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}


def _ratio(a, b):
    return a / b if a and b else None


def _row(n: int, j: dict, c: dict) -> dict:
    """One length's figures; each side's ``growth_mb`` per call (its peak over the loaded
    process), ratios circuit-tracer / jsae of the last call (the warm one with --repeat 2)."""
    row = {"tokens": n, "jsae": j, "circuit_tracer": c}
    for s in (j, c):
        if s.get("status") == "ok":
            for call in s["calls"]:
                call["growth_mb"] = call["peak_rss_mb"] - s["base_rss_mb"]
    if j.get("status") == "ok":
        p = j["plan"]  # the weights are in the loaded process already: not counted
        parts = [p["step_temp_bytes"], p["step_output_bytes"], p["rows_bytes"], p["adjacency_bytes"]]
        j["plan_mb"] = sum(x for x in parts if x) / 2**20
    if j.get("status") == "ok" and c.get("status") == "ok":
        jl, cl = j["calls"][-1], c["calls"][-1]
        row["ratios_circuit_tracer_over_jsae"] = {
            "peak_rss": _ratio(cl["peak_rss_mb"], jl["peak_rss_mb"]),
            "growth": _ratio(cl["growth_mb"], jl["growth_mb"]),
            "seconds": _ratio(cl["seconds"], jl["seconds"]),
            **({"peak_device": _ratio(cl["peak_device_mb"], j["peak_device_mb"])}
               if "peak_device_mb" in cl and "peak_device_mb" in j else {})}
    return row


def _fmt(x, f="{:.0f}"):
    return "-" if x is None else f.format(x)


def table(rows: list[dict]) -> list[str]:
    """Markdown: per length, each side's peak RSS (growth over the loaded process) and seconds,
    call by call (first / warm), the ratios of the last call, and jsae's plan."""
    head = ("| tokens | active features | jsae peak RSS MB (growth) | circuit-tracer peak RSS MB "
            "(growth) | ratio ct/jsae: peak (growth) | jsae s | circuit-tracer s | ratio ct/jsae s "
            "| jsae plan MB |")
    out = [head, "|" + " --- |" * (head.count("|") - 1)]

    def mem(s):
        if s.get("status") != "ok":
            return s.get("status", "-")
        return " / ".join(f"{x['peak_rss_mb']:.0f} ({x['growth_mb']:+.0f})" for x in s["calls"])

    def sec(s):
        return " / ".join(f"{x['seconds']:.2f}" for x in s["calls"]) if s.get("status") == "ok" else "-"

    for r in rows:
        j, c = r["jsae"], r["circuit_tracer"]
        rat = r.get("ratios_circuit_tracer_over_jsae", {})
        feats = j.get("active_features")
        if c.get("status") == "ok" and c["active_features"] != feats:
            feats = f"{feats} / ct {c['active_features']}"
        out.append(f"| {r['tokens']} | {_fmt(feats, '{}')} | {mem(j)} | {mem(c)} | "
                   f"{_fmt(rat.get('peak_rss'), '{:.2f}x')} ({_fmt(rat.get('growth'), '{:.2f}x')}) | "
                   f"{sec(j)} | {sec(c)} | {_fmt(rat.get('seconds'), '{:.2f}x')} | "
                   f"{_fmt(j.get('plan_mb'))} |")
    return out


def main(argv=None) -> int:
    a = parse(argv)
    import jax
    from device_suite import hf_folder, random_transcoders
    from toy import model_or_toy

    from jsae.export import gather, save_circuit_tracer
    from jsae.models import load

    print_header(f"hardware: {cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} on "
                 f"{jax.devices()[0].platform}")
    load_before = load_avg()
    tmp, model_path, _ = model_or_toy(None if a.model == "toy" else a.model, "jsae-attrmem-")
    work = Path(tmp)
    model = load(model_path)
    if a.lengths[-1] > model.cfg.max_position:
        print(f"error: --lengths {a.lengths[-1]} is longer than the model's context "
              f"({model.cfg.max_position})", file=sys.stderr)
        return 2
    ids = _tokens(model, a.lengths[-1])
    # one set of transcoders for every length, calibrated on the longest prompt (the shorter
    # ones are its prefixes: a causal model gives them the same features at their positions)
    tcs = random_transcoders(model, a.features, a.active, ids=ids)
    ct_dir = work / "transcoders"
    save_circuit_tracer(gather(tcs, str(model.name)), ct_dir)
    del model, tcs
    ct_python = None
    if not a.no_circuit_tracer:
        import importlib.util

        ct_python = os.environ.get("JSAE_CIRCUIT_TRACER_PYTHON") or (
            sys.executable if importlib.util.find_spec("circuit_tracer") else None)
    hf_dir = hf_folder(model_path, work, ct_python) if ct_python else None
    skipped = {"status": "skipped: circuit-tracer is not installed (set "
                         "JSAE_CIRCUIT_TRACER_PYTHON to a Python that has it)"
               if not a.no_circuit_tracer else "skipped: --no-circuit-tracer"}
    print(f"model {a.model}: {a.features} features per layer, ~{a.active} active per token, "
          f"batch {a.batch_size} rows, {a.repeat} attribution(s) per process", flush=True)
    rows = []
    for n in a.lengths:
        f = work / f"tokens-{n}.npy"
        np.save(f, ids[:n])
        args = [str(ct_dir), str(f), str(a.batch_size), str(a.repeat)]
        j = _child(sys.executable, _JSAE, [model_path, *args], a.timeout)
        c = _child(ct_python, _CT, [hf_dir, *args], a.timeout) if ct_python else dict(skipped)
        rows.append(_row(n, j, c))
        print(f"{n} tokens: " + "; ".join(
            f"{who} {s['status']}" + (f", peak {s['calls'][-1]['peak_rss_mb']:.0f} MB in "
                                      f"{s['calls'][-1]['seconds']:.2f} s" if s["status"] == "ok" else "")
            for who, s in (("jsae", j), ("circuit-tracer", c))), flush=True)
    print()
    print("\n".join(table(rows)))
    print(f"load average after: {load_avg()}")
    if a.json:
        doc = {"command": " ".join([sys.executable, *sys.argv]), "cpu": cpu_name(),
               "cores": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": load_avg(),
               "settings": {"model": a.model, "features_per_layer": a.features,
                            "active_per_token": a.active, "batch_size": a.batch_size,
                            "repeat": a.repeat},
               "rows": rows}
        Path(a.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every dictionary architecture on the same tokens: FVU, L0 and CE loss recovered, side by side.

    python benchmarks/architectures.py                      # 300k tokens, Gemma 3 270M, layer 6
    python benchmarks/architectures.py --tokens 100000 --archs topk,skip_transcoder
    python benchmarks/architectures.py --smoke              # toy model and text, every path, ~1 min
    python benchmarks/architectures.py --archs topk,batchtopk,matryoshka,jumprelu \
        --reuse --bench absorption,probing                   # + SAEBench's measures (jsae bench)

One `jsae harvest` of Gemma 3 270M's layer 6 (hook_resid_post for the SAEs, hook_resid_mid ->
hook_mlp_out for the transcoders) over the offline text, then `jsae train` of each architecture
from that cache (same rows, same order, same steps, lr and batch as configs/quickstart.yaml),
then `jsae eval` of each run on the same held-out contexts. Per-token budgets are matched where
the architecture has one (k = 32 for TopK, BatchTopK, Matryoshka and the TopK transcoders);
JumpReLU's quadratic penalty undershoots its target at this budget (target_l0 32 gave held-out
L0 24), so it aims at 42, and ReLU's and Gated's L1 coefficients are set so that their
held-out L0 lands near 32 too (measured: RESULTS.md), so FVU and CE compare at matched L0.
A transcoder's FVU is of the MLP's output and
its CE is with the MLP replaced (zero ablation: the MLP's output zeroed), so compare
transcoders with transcoders and SAEs with SAEs. Prints the hardware and a Markdown table; each
run's eval.json is kept under --out. ``--bench MEASURES`` also runs `jsae bench` (SAEBench's
measures: absorption, sparse probing, autointerp, multilingual concepts) on every SAE run and adds
its headline numbers to the table; ``--reuse`` keeps runs already trained and evaluated in --out.

``--smoke`` runs the same commands on a toy random Gemma 3 and a toy corpus (benchmarks/toy.py,
`--set model.name=... data.dataset=files`) for 4,096 tokens, with `jsae` called in this process
(`jsae.cli.main`, the function the `jsae` command runs) instead of a new Python per command: a
test that every architecture's config still trains and evaluates (tests/test_benchmarks.py), not
a measurement. Its table ends with `smoke: N architectures` and the ratio line
`train time ratio ARCH / topk: ...x`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LAYER = 6
SAE_HOOK = f"blocks.{LAYER}.hook_resid_post"
TC_IN, TC_OUT = f"blocks.{LAYER}.hook_resid_mid", f"blocks.{LAYER}.hook_mlp_out"

# architecture -> (base config, overrides); every run also gets the shared overrides below
RUNS: dict[str, tuple[str, list[str]]] = {
    "topk": ("configs/quickstart.yaml", []),
    "batchtopk": ("configs/quickstart.yaml", ["sae.architecture=batchtopk"]),
    "matryoshka": ("configs/matryoshka.yaml", []),
    "jumprelu": ("configs/jumprelu_target_l0.yaml", ["sae.target_l0=42"]),
    "relu": ("configs/quickstart.yaml", ["sae.architecture=relu", "sae.l1_coef=16"]),
    "gated": ("configs/quickstart.yaml", ["sae.architecture=gated", "sae.l1_coef=1.8"]),
    "transcoder": ("configs/transcoder.yaml", ["sae.architecture=transcoder"]),
    "skip_transcoder": ("configs/transcoder.yaml", []),
}


def hardware() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harvest import hardware as hw

    return hw()


IN_PROCESS = False  # --smoke: call jsae.cli.main here instead of starting `python -m jsae`


def jsae(*args: str) -> float:
    """Run ``python -m jsae ARGS`` (the CLI a user runs); its wall time in seconds."""
    t = time.perf_counter()
    if IN_PROCESS:
        from jsae.cli import main as cli

        rc = cli(list(args))
        if rc:
            raise SystemExit(f"jsae {' '.join(args)}: exit code {rc}")
    else:
        subprocess.run([sys.executable, "-m", "jsae", *args], check=True)
    return time.perf_counter() - t


# `jsae bench` measure -> (metric group, metric) shown in the table
HEADLINES = {
    "absorption": [("mean", "mean_absorption_fraction_score"), ("mean", "mean_full_absorption_score"),
                   ("mean", "mean_num_split_features")],
    "probing": [("sae", "sae_top_1_test_accuracy"), ("sae", "sae_top_5_test_accuracy"),
                ("sae", "sae_test_accuracy"), ("llm", "llm_test_accuracy")],
    "autointerp": [("offline", "label_detection_balanced_accuracy"),
                   ("autointerp", "autointerp_score")],
    "languages": [("all", "cross_lingual_share")],
}


def _bench_headlines(doc: dict) -> dict[str, float]:
    """The table's numbers from `jsae bench --json`: the metrics named in HEADLINES that the
    measure reported (a measure may group its metrics otherwise: then every number it has)."""
    out = {}
    for name, m in doc["measures"].items():
        metrics = m["metrics"] or {}
        picked = [(g, k) for g, k in HEADLINES.get(name, []) if k in (metrics.get(g) or {})]
        if not picked:
            picked = [(g, k) for g, v in metrics.items() if isinstance(v, dict)
                      for k, x in v.items() if isinstance(x, (int, float))]
        for g, k in picked:
            out[f"{name}.{k}"] = float(metrics[g][k])
    return out


def _earlier_rows(out: Path) -> dict[str, dict]:
    """The rows of an earlier results.json in ``out`` (--reuse), by architecture."""
    f = out / "results.json"
    return {r["arch"]: r for r in json.loads(f.read_text()).get("runs", [])} if f.is_file() else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=300_000, help="training tokens per run")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--downstream-tokens", type=int, default=4096)
    ap.add_argument("--archs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    ap.add_argument("--out", default="runs/architectures")
    ap.add_argument("--cache", help="reuse this harvest (default OUT/cache, harvested first)")
    ap.add_argument("--set", action="append", default=[], metavar="ARCH:KEY=VALUE",
                    help="an extra override for one architecture, e.g. relu:sae.l1_coef=20")
    ap.add_argument("--bench", default="",
                    help="comma-separated `jsae bench` measures to run on every SAE run (e.g. "
                         "absorption,probing); transcoders are skipped")
    ap.add_argument("--reuse", action="store_true",
                    help="keep runs of --out that are already trained and evaluated (their "
                         "train s is then the first run's)")
    ap.add_argument("--smoke", action="store_true",
                    help="toy model and corpus, 4,096 tokens, jsae in this process: checks every "
                         "architecture's path runs (not a measurement)")
    if ap.parse_known_args(argv)[0].smoke:  # smaller defaults; flags given still win
        ap.set_defaults(tokens=4096, eval_tokens=1024, downstream_tokens=256, out=None)
    args = ap.parse_args(argv)
    toy_sets: list[str] = []
    if args.smoke:
        global IN_PROCESS
        IN_PROCESS = True
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import tempfile

        import toy

        if args.out is None:  # a temporary folder, removed at exit
            import atexit
            import shutil

            args.out = tempfile.mkdtemp(prefix="jsae-arch-smoke-")
            atexit.register(shutil.rmtree, args.out, ignore_errors=True)
        folder = toy.write_model(Path(args.out) / "toy-model")
        corpus = toy.write_corpus(Path(args.out) / "toy-corpus.jsonl")
        toy_sets = toy.smoke_sets(folder, corpus)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in RUNS]
    if unknown:
        ap.error(f"unknown architectures {unknown}; known: {', '.join(RUNS)}")
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    extra: dict[str, list[str]] = {}
    for item in args.set:
        arch, _, kv = item.partition(":")
        extra.setdefault(arch, []).append(kv)
    print(hardware(), flush=True)

    hooks = f"[{SAE_HOOK},{TC_IN},{TC_OUT}]"
    toy = [x for s in toy_sets for x in ("--set", s)]
    t_harvest = 0.0 if args.cache or (args.reuse and cache.is_dir()) else jsae(
        "harvest", "configs/quickstart.yaml", "--out", str(cache), "--tokens", str(args.tokens),
        "--eval-tokens", str(args.eval_tokens), "--set", f"model.hooks={hooks}", *toy)
    rows, before = [], _earlier_rows(out)
    for arch in archs:
        base, over = RUNS[arch]
        run = out / arch
        shared = [f"run_dir={run}", "data.source=cache", f"data.path={cache}",
                  f"train.tokens={args.tokens}", f"eval.tokens={args.eval_tokens}",
                  "eval.show_features=0", "checkpoint.enabled=false"]
        sets = [x for s in toy_sets + shared + over + extra.get(arch, []) for x in ("--set", s)]
        earlier = before.get(arch) if args.reuse else None
        if earlier and (run / "eval" / "eval.json").is_file():
            t_train, t_eval = earlier["train_s"], earlier["eval_s"]
        else:
            t_train = jsae("train", base, *sets, "--fresh")
            t_eval = jsae("eval", str(run), "--tokens", str(args.eval_tokens),
                          "--downstream-tokens", str(args.downstream_tokens))
        doc = json.loads((run / "eval" / "eval.json").read_text())
        (hook, m), = doc["metrics"].items()
        replaces = (doc["info"].get("output_hooks") or {}).get(hook, hook)
        bench = {}
        if args.bench and replaces == hook:  # SAEBench's measures are of SAEs
            jsae("bench", str(run), "--only", args.bench, "--json", str(run / "bench.json"), "--overwrite")
            bench = _bench_headlines(json.loads((run / "bench.json").read_text()))
        rows.append({"arch": arch, "hook": hook, "replaces": replaces,
                     "overrides": over + extra.get(arch, []),
                     "train_s": t_train, "eval_s": t_eval, **m, "bench": bench})
        (out / "results.json").write_text(json.dumps(  # after every run: a partial table too
            {"hardware": hardware(), "tokens": args.tokens, "harvest_s": t_harvest,
             "runs": rows}, indent=2))
    print(f"\nharvest of {args.tokens:,} tokens x 3 hooks: {t_harvest:.0f} s")
    print("\n| architecture | reads -> reconstructs | L0 | FVU | CE loss recovered (zero abl.) "
          "| CE increase | KL / token | dead | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        where = r["hook"] if r["replaces"] == r["hook"] else f"{r['hook']} -> {r['replaces']}"
        print(f"| {r['arch']} | {where} | {r['l0']:.1f} | {r['fvu']:.4f} | "
              f"{r['ce_recovered_zero']:.4f} | {r['ce_delta']:.4f} | {r['kl_spliced']:.4f} | "
              f"{r['dead_frac']:.1%} | {r['train_s']:.0f} |")
    benched = [r for r in rows if r["bench"]]
    if benched:
        names = sorted({k for r in benched for k in r["bench"]})
        print("\n| architecture | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in benched:
            print(f"| {r['arch']} | " + " | ".join(
                f"{r['bench'][k]:.3f}" if isinstance(r["bench"].get(k), float) else "-"
                for k in names) + " |")
    if rows:
        base = next((r for r in rows if r["arch"] == "topk"), rows[0])
        print(f"train time ratio ARCH / {base['arch']}: " + ", ".join(
            f"{r['arch']} {r['train_s'] / base['train_s']:.2f}x" for r in rows))
    if args.smoke:
        print(f"smoke: {len(rows)} architectures trained and evaluated on the toy model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

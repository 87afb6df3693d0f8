"""`jsae bench RUN_DIR`: SAEBench's measures of how good a dictionary's features are
(absorption, sparse probing, autointerp, multilingual concepts), natively and offline."""

from __future__ import annotations

import argparse


def _measures():
    from jsae.bench import measures

    return measures()


def add_parser(sub) -> argparse.ArgumentParser:
    ms = _measures()
    p = sub.add_parser(
        "bench", help="SAEBench's measures of feature quality (absorption, probing, autointerp, languages)",
        description="Measure one dictionary of a run the way SAEBench does, offline: "
        + "; ".join(f"{name}: {(m.__doc__ or '').strip().splitlines()[0]}" for name, m in ms.items())
        + ". Writes one SAEBench-layout JSON file per measure into --out and a summary of "
        "every measure's metrics into --json.")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--hook", help="the dictionary's hook (default: the run's first)")
    p.add_argument("--only", default=",".join(ms),
                   help=f"comma-separated measures (default all: {','.join(ms)})")
    p.add_argument("--out", help="folder for the SAEBench-layout files (default RUN_DIR/bench/<hook>)")
    p.add_argument("--json", help="also write every measure's metrics to this one JSON file")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every measure (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per LM pass (default 16)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out / --json although they hold files jsae bench did not write")
    for name, m in ms.items():
        m.add_arguments(p.add_argument_group(name))
    return p


OWNER = "jsae bench"


def _only(args, available) -> list[str]:
    from jsae.bench import choices

    return choices(args.only, list(available), "--only")


def run(args) -> int:
    from pathlib import Path

    from jsae import jsonsafe, outputs, runs
    from jsae.analysis.cli_utils import log
    from jsae.analysis.run import load_run
    from jsae.bench import saebench_output

    ms = _measures()
    names = _only(args, ms)
    if args.batch_size < 1:
        from jsae.config import ConfigError

        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    for name in names:  # each measure refuses its own bad options before any work
        check = getattr(ms[name], "check_arguments", None)
        if check:
            check(args)
    # destinations are checked before the model loads: a refused command does no work
    if args.out:
        outputs.claim_folder(args.out, OWNER, overwrite=args.overwrite)
    if args.json:
        outputs.claim_file(args.json, OWNER, overwrite=args.overwrite)
    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, args.hook)
    out = Path(args.out) if args.out else Path(args.run_dir) / "bench" / runs.sae_dirname(r.hook)
    if not args.out:
        outputs.claim_folder(out, OWNER, overwrite=args.overwrite)
    summary, written = {}, []
    for name in names:
        m = ms[name]
        log(f"[{name}] {r.hook} ({r.sae.spec.d_sae} features) ...")
        res = m.evaluate(r, args, log=log)
        doc = saebench_output(m.EVAL_TYPE_ID, res, r)
        f = f"{m.EVAL_TYPE_ID}.json"
        jsonsafe.write(out / f, doc)
        written.append(f)
        outputs.record(out, OWNER, written)
        summary[name] = {"eval_type_id": m.EVAL_TYPE_ID, "metrics": doc["eval_result_metrics"],
                         "file": str(out / f)}
        for group, vals in (doc["eval_result_metrics"] or {}).items():
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in (vals.items() if isinstance(vals, dict) else [("", vals)]))
            print(f"{name:>12} {group}: {shown}")
    if args.json:
        jsonsafe.write(args.json, {"run": str(r.path), "hook": r.hook, "measures": summary})
        outputs.record_file(args.json, OWNER)
    print(f"\nwrote {', '.join(str(out / f) for f in written)}"
          + (f" and {args.json}" if args.json else ""))
    return 0

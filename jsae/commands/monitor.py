"""`jsae monitor RUN_DIR --feature I --threshold T --text TEXT`: highlight where features fire."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "monitor", help="highlight the tokens of texts where chosen features fire",
        description="Scan texts with the SAE at a hook and print them with the spans where each "
        "feature's code exceeds its threshold marked (labelled with the feature ids).")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--feature", type=int, action="append", required=True, help="feature id (repeatable)")
    p.add_argument("--threshold", type=float, action="append", default=[],
                   help="fires when the code exceeds this (one for all, or one per --feature; default 0)")
    p.add_argument("--text", action="append", default=[], help="text to scan (repeatable)")
    p.add_argument("--file", action="append", default=[], help="text file to scan (repeatable; '-' = stdin)")
    p.add_argument("--hook", help="hook point (default: the run's first hook)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--spans", action="store_true", help="also list every span with its peak code")
    return p


def run(args) -> int:
    import sys

    from jsae.analysis.cli_utils import log, use_color
    from jsae.analysis.run import load_run
    from jsae.monitor import render, scan

    texts = list(args.text)
    for f in args.file:
        texts.append(sys.stdin.read() if f == "-" else open(f, encoding="utf-8").read())
    if not texts:
        raise SystemExit("jsae monitor: give --text or --file")
    thr = args.threshold or [0.0]
    if len(thr) not in (1, len(args.feature)):
        raise SystemExit("jsae monitor: give one --threshold, or one per --feature")
    style = "ansi" if use_color(args.color) else "plain"
    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, args.hook)
    res = scan(r.model, r.sae, r.hook, texts, args.feature, thr)
    for i in range(len(texts)):
        n = len(res.spans[i])
        print(f"[text {i}] {n} span(s) where {', '.join(f'f{f}' for f in args.feature)} fire(s)")
        print(render(res, i, style=style))
        if args.spans:
            for s in res.spans[i]:
                print(f"  f{s.feature}  tokens {s.start}-{s.end}  peak {s.peak:.2f}  {s.text!r}")
        print()
    return 0

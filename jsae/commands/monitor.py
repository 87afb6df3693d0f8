"""`jsae monitor RUN_DIR ...`: highlight where features fire, fit and test detectors, apply them.

Three ways to call it:

- ``--feature I [--threshold T] --text TEXT``: mark where the features' codes exceed thresholds;
- ``--features 1838,4705 --train POS NEG [--test POS NEG] [--method probe] [--out det.json]``:
  fit a detector on labelled example files and report held-out precision / recall / F1 / AUROC;
- ``--detector det.json --text TEXT``: flag texts with a saved detector, firing tokens marked.
"""

from __future__ import annotations

import argparse
import math


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "monitor", help="highlight where features fire; fit, test and apply concept detectors",
        description="Scan texts with the SAE at a hook and print them with the spans where each "
        "feature's code exceeds its threshold marked (labelled with the feature ids). With --train "
        "POS NEG, fit a detector (thresholds or a logistic probe over the features) on example "
        "files (one text a line, or JSONL with 'text'), report precision/recall/F1/AUROC on --test "
        "POS NEG and save it as JSON; --detector applies a saved one.")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--feature", type=int, action="append", default=[], help="feature id (repeatable)")
    p.add_argument("--features", action="append", default=[],
                   help="comma-separated feature ids, e.g. 1838,4705 (same as repeating --feature)")
    p.add_argument("--threshold", type=float, action="append", default=[],
                   help="fires when the code exceeds this (one for all, or one per feature; default 0)")
    p.add_argument("--text", action="append", default=[], help="text to scan (repeatable)")
    p.add_argument("--file", action="append", default=[], help="text file to scan (repeatable; '-' = stdin)")
    p.add_argument("--hook", help="hook point (default: the run's first hook, or the detector's)")
    p.add_argument("--train", nargs=2, metavar=("POS", "NEG"), help="fit a detector on these example files")
    p.add_argument("--test", nargs=2, metavar=("POS", "NEG"), help="held-out example files to measure it on")
    p.add_argument("--method", choices=["threshold", "probe"], default="threshold",
                   help="detector: per-feature thresholds (any fires) or a logistic probe (default threshold)")
    p.add_argument("--out", help="where to save the fitted detector (default RUN_DIR/detectors/detector.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the --out file although jsae monitor did not write it")
    p.add_argument("--detector", help="apply a saved detector JSON to --text/--file")
    p.add_argument("--context-length", type=int, default=128,
                   help="tokens per training/test example; longer ones are truncated (default 128)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--spans", action="store_true", help="also list every span with its peak code")
    return p


def _parse_features(args) -> list[int]:
    from jsae.monitor import MonitorError

    out = list(args.feature)
    for chunk in args.features:
        for part in chunk.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise MonitorError(f"--features: {part!r} is not a feature id (give e.g. 1838,4705)") from None
    bad = [f for f in out if f < 0]
    if bad:
        raise MonitorError(f"feature ids must be >= 0; got {bad}")
    return out


def _check_args(args, feats: list[int]) -> None:
    from jsae.monitor import MonitorError

    for t in args.threshold:
        if not math.isfinite(t):
            raise MonitorError(f"--threshold must be a finite number; got {t}")
    if args.context_length < 2 or args.context_length > 100_000:
        raise MonitorError(f"--context-length must be between 2 and 100000; got {args.context_length}")
    if args.detector and (args.train or feats or args.threshold):
        raise MonitorError("--detector brings its own features and thresholds: drop --feature/--threshold/--train")
    if args.test and not args.train:
        raise MonitorError("--test needs --train POS NEG (or use a saved --detector)")
    if not args.detector and not feats:
        raise MonitorError("give --feature/--features, or --detector det.json")
    if args.train and args.threshold:
        raise MonitorError("--train fits the thresholds itself: drop --threshold")
    if not args.train and args.threshold and len(args.threshold) not in (1, len(feats)):
        raise MonitorError(f"give one --threshold, or one per feature ({len(feats)}); got {len(args.threshold)}")


def _texts(args) -> list[str]:
    import sys

    from jsae.data.text import read_text_file

    texts = list(args.text)
    for f in args.file:
        texts.append(sys.stdin.read() if f == "-" else read_text_file(f))
    return texts


def _print_scan(res, n_texts, names, style, spans, flags=None, scores=None):
    from jsae.monitor import render

    for i in range(n_texts):
        n = len(res.spans[i])
        head = f"[text {i}] {n} span(s) where {names} fire(s)"
        if flags is not None:
            head = f"[text {i}] {'FLAGGED' if flags[i] else 'not flagged'} (score {scores[i]:+.3f}); " \
                   f"{n} firing span(s)"
        print(head)
        print(render(res, i, style=style))
        if spans:
            for s in res.spans[i]:
                print(f"  f{s.feature}  tokens {s.start}-{s.end}  peak {s.peak:.2f}  {s.text!r}")
        print()


def _metrics_line(name: str, m: dict) -> str:
    return (f"{name:<6} precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}  "
            f"AUROC {m['auroc']:.3f}  accuracy {m['accuracy']:.3f}  "
            f"(TP {m['tp']} FP {m['fp']} FN {m['fn']} TN {m['tn']}; {m['n_pos']} pos / {m['n_neg']} neg)")


def run(args) -> int:
    from pathlib import Path

    from jsae.analysis.cli_utils import log, use_color
    from jsae.analysis.run import load_run
    from jsae.concepts import read_examples
    from jsae.monitor import (
        Detector,
        MonitorError,
        apply_detector,
        check_detector,
        check_features,
        evaluate_detector,
        fit_detector,
        scan,
    )

    feats = _parse_features(args)
    _check_args(args, feats)
    texts = _texts(args)
    if not args.train and not texts:
        raise MonitorError("give --text or --file to scan (or --train POS NEG to fit a detector)")
    # read every example file before paying for the model: bad input fails at once
    train = [read_examples(f) for f in args.train] if args.train else None
    test = [read_examples(f) for f in args.test] if args.test else None
    det = Detector.load(args.detector) if args.detector else None
    out = None
    if args.train:
        from jsae import outputs

        out = Path(args.out) if args.out else Path(args.run_dir) / "detectors" / "detector.json"
        outputs.claim_file(out, "jsae monitor", overwrite=args.overwrite,
                           recognise=outputs.json_with("format", "features"))
    style = "ansi" if use_color(args.color) else "plain"
    hook = args.hook or (det.hook if det else None)
    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, hook)

    if det is not None:
        check_detector(det, r.sae, r.hook, where=args.detector)
        flags, scores, res = apply_detector(det, r.model, r.sae, texts)
        _print_scan(res, len(texts), "", style, args.spans, flags, scores)
        return 0

    feats = check_features(r.sae, feats)
    if train is None:
        thr = args.threshold or [0.0]
        res = scan(r.model, r.sae, r.hook, texts, feats, thr)
        _print_scan(res, len(texts), ", ".join(f"f{f}" for f in feats), style, args.spans)
        return 0

    det = fit_detector(r.model, r.sae, r.hook, feats, train[0], train[1], kind=args.method,
                       context_length=args.context_length, run=str(Path(args.run_dir).resolve()), log=log)
    print(f"detector at {r.hook} over {', '.join(f'f{f}' for f in feats)} ({args.method})")
    if det.kind == "threshold":
        print("  thresholds: " + ", ".join(f"f{f} > {t:.3f}" if t is not None else f"f{f} off"
                                            for f, t in zip(det.features, det.thresholds)))
    else:
        print("  probe: " + " ".join(f"{c:+.2f}*f{f}" for f, c in zip(det.features, det.coef))
              + f" {det.intercept:+.2f} (standardised max codes)")
    print(_metrics_line("train", det.train))
    if test is not None:
        evaluate_detector(det, r.model, r.sae, test[0], test[1], log=log)
        print(_metrics_line("test", det.test))
    det.save(out)
    outputs.record_file(out, "jsae monitor")
    print(f"saved detector to {out}")
    if texts:
        flags, scores, res = apply_detector(det, r.model, r.sae, texts)
        _print_scan(res, len(texts), "", style, args.spans, flags, scores)
    return 0

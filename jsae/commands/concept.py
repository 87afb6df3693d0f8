"""`jsae concept RUN_DIR --positive pos.txt --negative neg.txt`: the features that separate two
sets of example texts (AUROC, difference of firing rates, a sparse logistic probe)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "concept", help="features that separate positive from negative example texts",
        description="Run both example sets (one text a line, or JSONL with a 'text' field) through "
        "the LM and every SAE of the run in one pass, and rank the features by how well their "
        "per-example max (or mean) code separates them: AUROC, the difference of firing rates, and "
        "a sparse (L1) logistic probe over a few features; each feature is shown with the positive "
        "example where it peaks and its top snippets from the offline corpus.")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--positive", required=True, help="examples of the concept (.txt or .jsonl)")
    p.add_argument("--negative", required=True, help="matched examples without it (.txt or .jsonl)")
    p.add_argument("--hook", action="append", default=[], help="hook(s) to score (default: every saved SAE)")
    p.add_argument("--reduce", choices=["max", "mean"], default="max",
                   help="per-example value of a feature: max or mean code over its tokens (default max)")
    p.add_argument("--rank", choices=["auroc", "diff"], default="auroc", help="ranking (default auroc)")
    p.add_argument("--top", type=int, default=10, help="features listed per hook (default 10)")
    p.add_argument("--probe-features", type=int, default=5,
                   help="at most this many features in the sparse probe (0 = no probe; default 5)")
    p.add_argument("--snippets", type=int, default=2,
                   help="top corpus snippets per feature (0 = none, skips the corpus scan; default 2)")
    p.add_argument("--contexts", type=int, default=256,
                   help="corpus contexts (64 tokens) scanned for snippets; cached in RUN_DIR/analysis")
    p.add_argument("--context-length", type=int, default=128,
                   help="tokens per example; longer ones are truncated and named (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per LM pass (default 16)")
    p.add_argument("--json", help="write the full ranking and probe to this JSON file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the --json file although jsae concept did not write it")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    return p


def _check(args) -> None:
    from jsae.concepts import ExampleError

    for name in ("top", "contexts", "context_length", "batch_size"):
        v = getattr(args, name)
        if v < 1:
            raise ExampleError(f"--{name.replace('_', '-')} must be >= 1; got {v}")
    for name in ("probe_features", "snippets"):
        if getattr(args, name) < 0:
            raise ExampleError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(args, name)}")


def example_snippet(tok, ids, position: int, style: str, width: int = 12) -> str:
    from jsae.analysis.render import render_snippet

    return render_snippet(tok, [int(i) for i in ids], int(position), left=width, right=width // 2, style=style)


def run(args) -> int:
    import json

    import numpy as np

    from jsae.analysis.cli_utils import log, use_color
    from jsae.analysis.render import render_snippets
    from jsae.analysis.run import Run, corpus_stats, load_run, run_hooks
    from jsae.concepts import contrast, read_examples
    from jsae.runs import sae_from_run

    _check(args)
    if args.json:
        from jsae import outputs

        outputs.claim_file(args.json, "jsae concept", overwrite=args.overwrite,
                           recognise=outputs.json_with("hooks"))
    pos, neg = read_examples(args.positive), read_examples(args.negative)  # fail before the model
    style = "ansi" if use_color(args.color) else "plain"
    hooks = args.hook or run_hooks(args.run_dir)
    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, hooks[0] if hooks else None)
    saes = {r.hook: r.sae}
    for h in hooks[1:]:
        saes[h] = sae_from_run(r.path, h)[0]
    log(f"scoring {len(pos)} positive / {len(neg)} negative examples at {', '.join(saes)} ...")
    res = contrast(r.model, saes, pos, neg, reduce=args.reduce, probe_features=args.probe_features,
                   context_length=args.context_length, batch_size=args.batch_size, log=log)
    tok = r.model.tokenizer
    report = {"run": str(r.path), "positive": str(args.positive), "negative": str(args.negative),
              "n_positive": len(pos), "n_negative": len(neg), "reduce": args.reduce, "hooks": {}}
    for h, c in res.items():
        corpus = contexts = None
        if args.snippets:
            corpus, contexts = corpus_stats(Run(r.path, r.model, saes[h], h, r.model_name), args.contexts, log=log)
        top = c.ranking(args.rank, args.top)
        print(f"{h}: features that separate {args.positive} ({len(pos)}) from {args.negative} ({len(neg)}); "
              f"per-example {args.reduce} code, ranked by {args.rank}\n")
        print(f"{'rank':>4} {'feature':>8} {'AUROC':>6} {'fires+':>7} {'fires-':>7} {'diff':>6} "
              f"{'mean+':>7} {'mean-':>7}")
        rows = []
        for i, f in enumerate(top):
            f = int(f)
            print(f"{i + 1:>4} {f:>8} {c.auroc[f]:6.3f} {c.rate_pos[f]:7.1%} {c.rate_neg[f]:7.1%} "
                  f"{c.diff[f]:+6.2f} {c.mean_pos[f]:7.3f} {c.mean_neg[f]:7.3f}")
            row = {"feature": f, "auroc": float(c.auroc[f]), "rate_pos": float(c.rate_pos[f]),
                   "rate_neg": float(c.rate_neg[f]), "diff": float(c.diff[f]),
                   "mean_pos": float(c.mean_pos[f]), "mean_neg": float(c.mean_neg[f])}
            if c.rate_pos[f] > 0:
                e = c.best_example(f)
                snip = example_snippet(tok, c.codes.ids[e], c.codes.argmax[e, f], style)
                print(f"{'':>14}best positive ({c.examples.origins[e]}, {c.codes.max[e, f]:.2f}): {snip}")
                row["best_positive"] = {"origin": c.examples.origins[e], "value": float(c.codes.max[e, f]),
                                        "snippet": example_snippet(tok, c.codes.ids[e], c.codes.argmax[e, f], "plain")}
            if corpus is not None:
                snips = render_snippets(tok, contexts, corpus, f, n=args.snippets, style=style)
                for s in snips:
                    print(f"{'':>14}corpus: {s.strip()}")
                if not snips:
                    print(f"{'':>14}(no corpus snippet: did not fire on {len(contexts)} contexts)")
                row["corpus_frequency"] = float(corpus.frequency[corpus.row(f)])
            rows.append(row)
        entry = {"ranking": rows}
        if c.probe is not None:
            p = c.probe
            terms = " ".join(f"{w:+.2f}*f{int(f)}" for f, w in zip(p.features, p.coef))
            print(f"\n  sparse probe ({len(p.features)} features, L1 then refit; train accuracy "
                  f"{p.train_accuracy:.3f}): logit = {terms} {p.intercept:+.2f} (standardised {args.reduce} codes)")
            entry["probe"] = {"features": [int(f) for f in p.features], "coef": p.coef.tolist(),
                              "intercept": p.intercept, "mean": p.mean.tolist(), "scale": p.scale.tolist(),
                              "train_accuracy": p.train_accuracy}
        neg_top = np.argsort(c.auroc, kind="stable")[:3]
        print("  most negative-leaning: " + ", ".join(f"f{int(f)} (AUROC {c.auroc[f]:.3f})" for f in neg_top))
        print()
        report["hooks"][h] = entry
    if args.json:
        from jsae.fileio import write_text

        write_text(args.json, json.dumps(report, indent=1) + "\n")
        outputs.record_file(args.json, "jsae concept")
        log(f"wrote {args.json}")
    return 0

"""`jsae languages RUN_DIR`: which features are shared across English, French and Spanish, and
do parallel articles light up the same features?"""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "languages", help="language-specific vs shared features on parallel en/fr/es text",
        description="Run the offline corpus's parallel Wikipedia summaries (the same article in "
        "several languages, matched by identical title) through the LM and every SAE of the run; "
        "report per-feature firing rates per language, a monolinguality score (max/sum of the "
        "per-language rates), the share of language-specific and shared features per hook, and "
        "the Jaccard overlap of the active feature sets of the same article in two languages "
        "against unrelated article pairs. Writes a table, a JSON file and a PNG.")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--hook", action="append", default=[], help="hook(s) (default: every saved SAE)")
    p.add_argument("--langs", default="en,fr,es", help="comma-separated languages (default en,fr,es)")
    p.add_argument("--articles", type=int, default=200, help="parallel articles used (default 200)")
    p.add_argument("--context-length", type=int, default=128,
                   help="tokens per article (longer summaries are truncated; default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per LM pass (default 16)")
    p.add_argument("--specific", type=float, default=0.8,
                   help="monolinguality at or above which a feature is language-specific (default 0.8)")
    p.add_argument("--shared", type=float, default=0.2,
                   help="shared if every language's rate is at least this times the largest (default 0.2)")
    p.add_argument("--min-count", type=int, default=5,
                   help="features firing on fewer tokens in all are 'rare', not judged (default 5)")
    p.add_argument("--seed", type=int, default=0, help="article sample and unrelated pairing (default 0)")
    p.add_argument("--out", help="output folder (default RUN_DIR/languages)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out although it holds files jsae languages did not write")
    return p


def _check(args) -> list[str]:
    import math

    from jsae.config import ConfigError

    langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    if len(langs) < 2 or len(set(langs)) != len(langs):
        raise ConfigError(f"--langs needs at least two distinct languages; got {args.langs!r}")
    if args.articles < 2:
        raise ConfigError(f"--articles must be >= 2; got {args.articles}")
    if args.context_length < 2 or args.batch_size < 1:
        raise ConfigError("--context-length must be >= 2 and --batch-size >= 1")
    L = len(langs)
    if not (math.isfinite(args.specific) and 1.0 / L < args.specific <= 1.0):
        raise ConfigError(f"--specific must be in ({1.0 / L:.3f}, 1] for {L} languages; got {args.specific}")
    if not (math.isfinite(args.shared) and 0.0 < args.shared <= 1.0):
        raise ConfigError(f"--shared must be in (0, 1]; got {args.shared}")
    if args.min_count < 1:
        raise ConfigError(f"--min-count must be >= 1; got {args.min_count}")
    return langs


OWNER = "jsae languages"  # what jsae.outputs records as the writer of the output folder


def run(args) -> int:
    import json
    from pathlib import Path

    from jsae import outputs
    from jsae.analysis.cli_utils import log
    from jsae.analysis.languages import (
        analyse_languages,
        format_report,
        parallel_articles,
        plot_report,
    )
    from jsae.analysis.run import load_run, run_hooks
    from jsae.runs import sae_from_run

    langs = _check(args)
    out = Path(args.out) if args.out else Path(args.run_dir) / "languages"
    outputs.claim_folder(out, OWNER, overwrite=args.overwrite,
                         recognise=lambda p: (p / "languages.json").is_file())
    arts = parallel_articles(langs, args.articles, seed=args.seed)
    if len(arts) < 2:
        raise FileNotFoundError(f"fewer than two articles exist in all of {', '.join(langs)}")
    hooks = args.hook or run_hooks(args.run_dir)
    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, hooks[0] if hooks else None)
    saes = {r.hook: r.sae}
    for h in hooks[1:]:
        saes[h] = sae_from_run(r.path, h)[0]
    log(f"{len(arts)} parallel articles x {len(langs)} languages through {', '.join(saes)} ...")
    rep = analyse_languages(r.model, saes, arts, langs=langs, context_length=args.context_length,
                            batch_size=args.batch_size, specific=args.specific, shared=args.shared,
                            min_count=args.min_count, seed=args.seed, log=log)
    print(format_report(rep))
    from jsae.fileio import write_text

    write_text(out / "languages.json", json.dumps(rep.to_json(), indent=1) + "\n")
    plot_report(rep, out / "languages.png")
    outputs.record(out, OWNER, ["languages.json", "languages.png"])
    print(f"\nwrote {out / 'languages.json'} and {out / 'languages.png'}")
    return 0

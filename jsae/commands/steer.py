"""`jsae steer RUN_DIR --feature I --value V --prompt TEXT`: baseline and steered continuations
side by side (same sampling key)."""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_float, nonneg_int, positive_int, probability, steer_value
from jsae.errors import BadInput


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "steer", help="generate with features clamped, scaled or ablated, next to the baseline",
        description="Continue prompts with and without an intervention on SAE features at a hook "
        "(the SAE error term is kept), printed side by side; both use the same sampling key.")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--feature", type=nonneg_int, action="append", required=True,
                   help="feature id (repeat for several)")
    p.add_argument("--value", type=steer_value, action="append", default=[],
                   help="clamp value in code units, or NUMx for NUM times the feature's largest "
                   "activation on the corpus (one for all features, or one per --feature)")
    p.add_argument("--mode", choices=["clamp", "scale", "ablate", "add"], default="clamp",
                   help="clamp: set to value; scale: multiply by value; ablate: remove; "
                   "add: add value x the decoder direction (default clamp)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--tokens", type=positive_int, default=32, help="new tokens to generate (default 32)")
    p.add_argument("--hook", help="hook point (default: the run's first hook)")
    p.add_argument("--on", choices=["all", "prompt", "generated"], default="all",
                   help="positions the intervention acts on (default all)")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed, shared by both runs")
    p.add_argument("--no-error-term", action="store_true",
                   help="replace the activation by the edited SAE reconstruction")
    p.add_argument("--contexts", type=positive_int, default=1024,
                   help="corpus contexts scanned to resolve NUMx values (cached in the run folder)")
    return p


def build_interventions(run, features, values, mode: str, keep_error: bool, corpus=None):
    """(interventions {hook: fn}, description) for the command's arguments."""
    import numpy as np

    from jsae import steering
    from jsae.analysis.cli_utils import parse_value
    from jsae.runs import input_hooks

    out = getattr(run, "output_hook", None)  # a transcoder writes to another hook
    from jsae.sae.archs import get_arch

    arch = get_arch(run.sae.spec.architecture)
    # a cross-layer transcoder is causal (each feature reads its own layer): clamp works there
    if arch.multi_hook and arch.feature_layers(run.sae.spec) is None and mode != "add":
        raise BadInput(f"a {run.sae.spec.architecture}'s codes read all of its hooks, later ones "
                         f"included, so --mode {mode} cannot act during the forward pass; use "
                         "--mode add (adds value x its decoder row at every hook)")
    if mode == "ablate":
        return steering.interventions_for(run.sae, run.hook, steering.ablate, features,
                                          keep_error=keep_error, output_hook=out), \
            ", ".join(f"f{f} ablated" for f in features)
    if not values:
        raise BadInput(f"--mode {mode} needs --value")
    if len(values) not in (1, len(features)):
        raise BadInput("give one --value, or one per --feature")
    parsed = [parse_value(v) for v in values] * (len(features) if len(values) == 1 else 1)
    resolved = []
    for f, (kind, v) in zip(features, parsed):
        if kind == "max":
            if corpus is None:
                raise BadInput("NUMx values need corpus statistics")
            peak = float(corpus.max[corpus.row(f)])
            if peak <= 0:
                raise BadInput(f"feature {f} never fired on the corpus sample; give an absolute value")
            v = v * peak
        resolved.append(v)
    vals = np.asarray(resolved, np.float32)
    if mode in ("clamp", "scale"):
        transform = steering.clamp if mode == "clamp" else steering.scale
        sym = ":=" if mode == "clamp" else "x"
        desc = ", ".join(f"f{f} {sym} {v:.3g}" for f, v in zip(features, vals))
        return steering.interventions_for(run.sae, run.hook, transform, features, vals,
                                          keep_error=keep_error, output_hook=out), desc
    desc = ", ".join(f"+{v:.3g} x dir(f{f})" for f, v in zip(features, vals))
    writes = input_hooks(out or run.hook)  # decoder rows live where it writes
    return steering.add_feature(run.sae, writes, features, vals), desc


def run(args) -> int:
    from jsae.analysis.cli_utils import log, parse_value, side_by_side
    from jsae.analysis.run import corpus_stats, load_run
    from jsae.steering import generate_pair

    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, args.hook)
    for f in args.feature:
        if not 0 <= f < r.sae.spec.d_sae:
            raise BadInput(f"feature {f} out of range (the SAE has {r.sae.spec.d_sae})")
    corpus = None
    if args.mode in ("clamp", "scale", "add") and any(parse_value(v)[0] == "max" for v in args.value):
        corpus, _ = corpus_stats(r, args.contexts, log=log)
    fns, desc = build_interventions(r, args.feature, args.value, args.mode, not args.no_error_term, corpus)
    log(f"generating {args.tokens} tokens for {len(args.prompt)} prompt(s) on {r.model_name}, "
        f"{desc} at {r.hook}{f' -> {r.output_hook}' if r.output_hook else ''} "
        f"(positions: {args.on}) ...")
    base, steered = generate_pair(r.model, args.prompt, fns, args.tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, intervene_on=args.on)
    for prompt, b, s in zip(args.prompt, base, steered):
        print(f"\nprompt: {prompt!r}\n")
        print(side_by_side("baseline", prompt + b, f"steered ({desc})", prompt + s))
    return 0

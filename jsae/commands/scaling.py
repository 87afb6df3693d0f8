"""`jsae scaling RUN RUN [RUN...] --out DIR [--compute C]`: scaling laws over dictionaries of
different sizes on one hook.

Each RUN is a run directory or an SAE folder (a family member's ``saes/<hook>/<name>/`` too)
trained with ``eval.at_tokens`` (e.g. ``log:8``), which records held-out metrics at those
token counts. Fits, for the chosen metric: loss against training compute per size as
``a C^-b + c``; the compute-efficient frontier; ``L(N, D) = E + A/N^alpha + B/D^beta`` and from
it the optimal features N* ~ C^a and tokens D* ~ C^b, with bootstrap spreads. Writes
``scaling.json``, ``loss_vs_tokens.png``, ``frontier.png`` and ``optimal.png`` into DIR and,
with ``--compute``, prints the size and tokens it recommends for that many training FLOPs.
"""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_int


def _positive_float(text: str) -> float:
    from jsae.commands._args import finite_float

    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "scaling", help="fit scaling laws (loss vs compute, optimal features and tokens) over runs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories or SAE folders of one hook, different sizes")
    p.add_argument("--out", required=True, help="folder for scaling.json and the PNGs")
    p.add_argument("--hook", default=None, help="the hook, for runs that train several")
    p.add_argument("--metric", default="fvu",
                   help="held-out metric to fit (default fvu; e.g. mse, mse_per_token)")
    p.add_argument("--compute", type=_positive_float, default=None, metavar="FLOPS",
                   help="a training budget in FLOPs: print the recommended size and tokens")
    p.add_argument("--min-tokens", type=nonneg_int, default=0, metavar="N",
                   help="fit only points recorded at or after N training tokens (leave out the "
                   "first steps' transient; default 0: every point)")
    p.add_argument("--bootstrap", type=nonneg_int, default=100,
                   help="bootstrap refits for the exponents' spread (default 100)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into DIR although jsae scaling did not write it")
    return p


def run(args) -> int:
    from pathlib import Path

    from jsae import jsonsafe, outputs
    from jsae.scaling.laws import scaling_laws
    from jsae.scaling.members import read_members
    from jsae.scaling.plots import scaling_pngs

    out = Path(args.out)
    outputs.claim_folder(out, OWNER, overwrite=args.overwrite)
    members = read_members(args.runs, args.hook)
    result = scaling_laws(members, args.metric, compute=args.compute, bootstrap=args.bootstrap,
                          min_tokens=args.min_tokens)
    out.mkdir(parents=True, exist_ok=True)
    jsonsafe.write(out / "scaling.json", result)
    names = ["scaling.json", *scaling_pngs(result, out)]
    outputs.record(out, OWNER, names)
    _report(result, out)
    return 0


def _report(result: dict, out) -> None:
    j = result["joint"]
    sizes = ", ".join(f"{m['d_sae']:,}" for m in result["members"])
    print(f"{len(result['points'])} points from {len(result['members'])} dictionaries "
          f"({sizes} features) on "
          f"{result['hook']}; metric {result['metric']}")
    if "alpha" in j:
        print(f"L(N, D) = {j['E']:.4g} + {j['A']:.4g}/N^{j['alpha']:.3f} + "
              f"{j['B']:.4g}/D^{j['beta']:.3f}  (rms log error {j['rel_rmse']:.3f})")
        print(f"optimal features N* ~ C^{j['n_exponent']:.3f} +- {j['n_exponent_sd']:.3f}, "
              f"tokens D* ~ C^{j['d_exponent']:.3f} +- {j['d_exponent_sd']:.3f} "
              f"(bootstrap sd, {j['bootstrap']} refits)")
        if j["at_bound"]:
            print(f"warning: {' and '.join(j['at_bound'])} reached the fit's bound: these runs "
                  "do not constrain it (train longer or over more sizes)")
    else:
        print(f"joint fit skipped: {j['skipped']}")
    r = result.get("recommendation")
    if r:
        pred = f", predicted {result['metric']} {r['predicted']:.4g}" if r["predicted"] else ""
        print(f"for {r['compute']:.3g} FLOPs: {round(r['features']):,} features, "
              f"{round(r['tokens']):,} tokens{pred} ({r['from']}"
              f"{'; extrapolated beyond the runs' if r['extrapolated'] else ''})")
    print(f"wrote {out / 'scaling.json'} and the plots")


OWNER = "jsae scaling"

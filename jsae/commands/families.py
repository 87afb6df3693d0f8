"""`jsae families RUN_SMALL RUN_LARGER [...] --out DIR`: how features split as the dictionary
grows.

Each RUN is a run directory or an SAE folder (a family member's ``saes/<hook>/<name>/`` too)
on the same hook of the same model; they are ordered by size. Each dictionary's features are
matched to the next smaller one's by decoder cosine (exact: every pair is compared); a match
below ``--min-cos`` leaves a feature without a parent. The trees start at the smallest
dictionary's features. With ``--activations`` (a ``.npy`` of the hook's activations, or a
`jsae harvest` cache: its held-out rows, ``--sample`` of them, default 16,384) the match is also read from co-activation (how often the parent fires where the
child does, and which parent fires most with it) and each split is scored by how much of the
parent's firing its children's union covers. Writes ``families.json`` and ``families.png``.
"""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_int, positive_int


def _cosine(text: str) -> float:
    from jsae.commands._args import finite_float

    v = finite_float(text)
    if not -1 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine in [-1, 1], got {text!r}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "families", help="feature splitting: match features across dictionary sizes into trees",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories or SAE folders of one hook, different sizes")
    p.add_argument("--out", required=True, help="folder for families.json and families.png")
    p.add_argument("--hook", default=None, help="the hook, for runs that train several")
    p.add_argument("--min-cos", type=_cosine, default=0.5,
                   help="the least decoder cosine for a match (default 0.5)")
    p.add_argument("--activations", default=None, metavar="X.npy|CACHE",
                   help="activation sample for co-activation and coverage: a .npy array "
                   "[tokens, d_in], or a `jsae harvest` cache (its held-out rows)")
    p.add_argument("--sample", type=positive_int, default=None,
                   help="use the first N rows of --activations")
    p.add_argument("--top", type=nonneg_int, default=20,
                   help="families listed in full (the most descendants first; default 20)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into DIR although jsae families did not write it")
    return p


def run(args) -> int:
    from pathlib import Path

    from jsae import jsonsafe, outputs
    from jsae.scaling.members import read_members
    from jsae.scaling.plots import families_png
    from jsae.scaling.splitting import cache_sample, families, read_sample

    out = Path(args.out)
    outputs.claim_folder(out, OWNER, overwrite=args.overwrite)
    members = read_members(args.runs, args.hook)
    x = None
    if args.activations and outputs.is_cache_dir(Path(args.activations)):
        x = cache_sample(args.activations, members[0].hook, args.sample)
    elif args.activations:
        from jsae.sae.archs import get_arch

        spec = members[0].spec
        x = read_sample(args.activations, get_arch(spec.architecture).token_shape(spec),
                        args.sample)
    saes = [m.load()[0] for m in members]
    result = families(members, saes, x, min_cos=args.min_cos, top=args.top)
    out.mkdir(parents=True, exist_ok=True)
    jsonsafe.write(out / "families.json", result)
    names = ["families.json", families_png(result, out / "families.png")]
    outputs.record(out, OWNER, names)
    for lv in result["levels"]:
        cover = (f", children cover {lv['coverage_mean']:.0%} of a parent's firing"
                 if lv.get("coverage_mean") is not None else "")
        print(f"{lv['parent_d_sae']:,} -> {lv['child_d_sae']:,} features: "
              f"{lv['matched_frac']:.0%} matched (cos >= {args.min_cos}), "
              f"{lv['split_frac']:.0%} of parents split, {lv['mean_children']:.2f} children "
              f"per matched parent{cover}")
    print(f"wrote {out / 'families.json'} and {out / 'families.png'}")
    return 0


OWNER = "jsae families"

"""How decoder structure grows with training: the median nearest-neighbour decoder cosine of every
dictionary of a run (a family's members too) at every kept checkpoint.

    python benchmarks/structure_vs_budget.py runs/scaling_sweep [--json out.json]
    python benchmarks/structure_vs_budget.py --smoke   # a synthetic 2-member family, trained first

A young dictionary's directions are nearly orthogonal (the quickstart's 10k features after 300k
tokens: 0.20); neighbours that share a theme have cosines well above that. The atlas's own figure
(`jsae atlas` prints it, from live features only) is `jsae.analysis.atlas.structure`; this one
needs no atlas pass: every feature, from the checkpoints alone, so it can follow a sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def median_nn_cos(sae) -> float:
    from jsae.analysis.atlas.neighbours import decoder_neighbours, decoder_rows

    _, cos = decoder_neighbours(decoder_rows(sae), n=1)
    return float(np.nanmedian(cos[:, 0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a training run folder (its checkpoints are read)")
    p.add_argument("--smoke", action="store_true",
                   help="train a synthetic family of two widths (40 steps) and read it")
    p.add_argument("--json", help="also write the table as JSON")
    a = p.parse_args(argv)
    from machine import print_header

    from jsae.runs import run_config, run_hooks, sae_from_run

    print_header("structure against training tokens")
    if a.smoke == bool(a.run):
        p.error("give a RUN folder or --smoke")
    run = _smoke_run() if a.smoke else Path(a.run)
    keys = run_hooks(run)
    steps = sorted(int(d.name) for d in (run / "checkpoints").iterdir()
                   if d.name.isdigit() and (d / "meta").exists())  # finished checkpoints
    batch = int(run_config(run)["train"]["batch_size"])
    rows = []
    for s in steps:
        for k in keys:
            sae, _ = sae_from_run(run, k, step=s)
            rows.append({"key": k, "d_sae": sae.spec.d_sae, "step": s,
                         "tokens": s * batch, "median_nn_cos": median_nn_cos(sae)})
            r = rows[-1]
            print(f"{k:45s} {r['d_sae']:>7,} features  step {s:>5}  "
                  f"{r['tokens']:>10,} tokens  median nn cos {r['median_nn_cos']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def _smoke_run() -> Path:
    """configs/synthetic.yaml as a family of two widths, 40 steps, a checkpoint every 10."""
    import tempfile

    from jsae import config as config_lib
    from jsae.runner import run_training

    run = Path(tempfile.mkdtemp(prefix="structure-smoke-")) / "run"
    cfg = config_lib.load(Path(__file__).resolve().parent.parent / "configs/synthetic.yaml", [
        f"run_dir={run}", "train.steps=40", "train.batch_size=256", "train.progress=false",
        "checkpoint.every_steps=10", "checkpoint.keep=10", "eval.tokens=1024",
        "family=[{name: w256, sae: {d_sae: 256}}, {name: w512, sae: {d_sae: 512}}]"])
    run_training(cfg, print_fn=lambda s: None)
    return run


if __name__ == "__main__":
    raise SystemExit(main())

"""How decoder structure grows with training: the median nearest-neighbour decoder cosine of every
dictionary of a run (a family's members too) at every kept checkpoint.

    python benchmarks/structure_vs_budget.py runs/scaling_sweep [--json out.json]

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
    p.add_argument("run", help="a training run folder (its checkpoints are read)")
    p.add_argument("--json", help="also write the table as JSON")
    a = p.parse_args(argv)
    from machine import print_header

    from jsae.runs import run_config, run_hooks, sae_from_run

    print_header("structure against training tokens")
    run = Path(a.run)
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


if __name__ == "__main__":
    raise SystemExit(main())

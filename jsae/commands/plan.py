"""`jsae plan CONFIG --mesh data=D,model=M`: per-device memory of the compiled training step.

Compiles the exact step `jsae train` would run (abstract shapes, nothing allocated) and prints
bytes per device for params, optimizer state, the batch and activations (XLA's memory
analysis).  With fewer real devices than the mesh needs it simulates CPU devices (see
`jsae.plan`).  ``--fit 80GB`` also solves for the largest d_sae whose planned peak fits.
"""

from __future__ import annotations

import argparse
import json

from jsae.commands._args import positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="per-device memory of the training step for a config and mesh")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="mesh to plan for (default: the config's mesh section; -1 means 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sae.d_sae=16777216 (repeatable)")
    p.add_argument("--d-in", type=positive_int, default=None,
                   help="activation width (needed when the model is not known offline)")
    p.add_argument("--fit", default=None, metavar="BYTES",
                   help="also report the largest d_sae whose peak fits this per-device budget "
                        "(e.g. 80GB, 16GiB, 7.5e10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def parse_bytes(text: str) -> float:
    t = text.strip().lower().replace(" ", "")
    units = {"gib": 1024**3, "mib": 1024**2, "kib": 1024, "gb": 1e9, "mb": 1e6, "kb": 1e3,
             "tb": 1e12, "tib": 1024**4, "b": 1}
    for u, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return float(t[: -len(u)]) * mult
    return float(t)


def run(args) -> int:
    from jsae import config as config_lib
    from jsae import plan as plan_lib
    from jsae.config import ConfigError

    budget = None
    if args.fit:
        try:
            budget = parse_bytes(args.fit)
        except ValueError:
            budget = float("nan")
        if not (budget > 0 and budget < float("inf")):
            raise ConfigError(f"--fit {args.fit!r}: expected a positive size such as 80GB, "
                              "16GiB or 7.5e10")
    cfg = config_lib.load(args.config, list(args.overrides))
    if args.mesh:
        data, model = plan_lib.parse_mesh(args.mesh)
    else:
        data, model = max(cfg.mesh.data, 1), cfg.mesh.model
    plan_lib.ensure_devices(data * model)
    p = plan_lib.plan(cfg, data, model, args.d_in)
    out = {"plan": p.as_dict()}
    if args.fit:
        best, p0, p1 = plan_lib.largest_d_sae(cfg, budget, data, model, args.d_in)
        f0, f1 = (sum(p.d_sae.values()) for p in (p0, p1))
        per_latent = (p1.peak - p0.peak) / (f1 - f0)
        out["fit"] = {"budget_bytes": budget, "largest_d_sae": best,
                      "bytes_per_latent_per_device": per_latent, "probe_d_sae": [f0, f1]}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(p.table())
    if p.simulated or p.backend == "cpu":
        print("note: compiled for the CPU backend; params/optimizer/batch bytes are exact for any "
              "backend, 'activations (temp)' is the CPU compiler's figure (a guide for TPU/GPU)")
    if args.fit:
        print(f"largest d_sae with planned peak <= {budget / 1e9:.1f} GB per device: "
              f"{out['fit']['largest_d_sae']:,} (computed by a linear fit of two compiles at "
              f"d_sae {f0:,} and {f1:,}: {per_latent:,.0f} B per latent per device; not measured)")
    return 0

"""`jsae export RUN_DIR --format saelens OUT`: write a run's SAEs in another tool's format."""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="export trained SAEs (SAELens, Gemma Scope, circuit-tracer, jsae)",
        description="Write the SAEs of a run directory for other tools. saelens: cfg.json + "
        "sae_weights.safetensors as SAELens 6 (and Neuronpedia, SAEBench) load them, with the "
        "normalisation folded into the weights; gemmascope: params.npz (JumpReLU SAEs); "
        "jsae: jsae's own folder; circuit-tracer: a transcoder for every layer (layer_N.safetensors) "
        "or a cross-layer transcoder (W_enc_N / W_dec_N) with config.yaml, as circuit-tracer loads "
        "them; gemmascope2: Gemma Scope 2's transcoder folders (params.safetensors, "
        "affine_skip_connection) or CLT (params_layer_N.safetensors). The newest of the final SAE "
        "and the latest checkpoint is used. "
        "OUT must be new, empty or an earlier export (or --overwrite); never a run or a cache.",
    )
    p.add_argument("run_dir", help="run directory of `jsae train`")
    p.add_argument("out", help="output folder (one sub-folder per hook when there are several)")
    p.add_argument("--format", default="saelens", choices=["saelens", "gemmascope", "jsae",
                                                     "circuit-tracer", "gemmascope2"])
    p.add_argument("--hook", action="append", default=None,
                   help="hook to export (repeatable; default: all)")
    p.add_argument("--member", metavar="NAME",
                   help="a family member's dictionaries only (of a family of transcoder sets, "
                   "what circuit-tracer and gemmascope2 export: one member at a time)")
    p.add_argument("--step", type=nonneg_int, default=None, help="export this checkpoint step")
    p.add_argument("--overwrite", action="store_true",
                   help="write into OUT although it holds other files (only the exported files "
                   "are replaced; nothing else is removed)")
    return p


def run(args) -> int:
    from jsae.export import export_run

    for path in export_run(args.run_dir, args.out, format=args.format, hooks=args.hook,
                           step=args.step, overwrite=args.overwrite, member=args.member):
        print(f"wrote {path}")
    return 0

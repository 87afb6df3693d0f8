"""`jsae eval PATH [--tokens N] [--json OUT.json]`: the metrics papers and SAEBench report.

PATH is a jsae run directory (``saes/<hook>/`` + ``config.yaml``), one jsae SAE folder, or an
imported SAELens / Gemma Scope folder (give ``--model`` and ``--hook`` when its files do not
say). Prints a table and writes ``eval.json``, ``feature_density.png`` and per-hook density
arrays (default folder: ``PATH/eval/``). On a run holding a transcoder set or a cross-layer
transcoder it evaluates the replacement model (every MLP replaced at once, and each alone: CE
recovered, KL, top-1 agreement, residual explained, FVU and L0 per layer;
`jsae.evals.replacement`), printed as a second table and written under ``replacement``; on
a family of them, each member's replacement model, under ``replacement.members.<name>``.
"""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_int, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="evaluate SAEs: L0, FVU, CE loss recovered, KL, dead/dense latents",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory, SAE folder, or SAELens / Gemma Scope folder")
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="evaluation tokens (positions an SAE trains on; default eval.tokens)")
    p.add_argument("--downstream-tokens", type=nonneg_int, default=None,
                   help="tokens for the CE/KL metrics, which run the whole LM 1 + 3H times "
                   "(default eval.downstream_tokens: 4096 on a CPU, else --tokens)")
    p.add_argument("--json", dest="json_path", default=None, metavar="OUT.json",
                   help="where to write the metrics (default PATH/eval/eval.json)")
    p.add_argument("--out-dir", default=None, help="folder for plots (default: beside the JSON)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace eval.json / the plot although jsae eval did not write them")
    p.add_argument("--model", default=None, help="LM name or path (default: the run's model)")
    p.add_argument("--hook", default=None, help="hook of an imported SAE, e.g. blocks.6.hook_resid_post")
    p.add_argument("--batch-size", type=positive_int, default=None, help="contexts per LM pass (default eval.batch_size)")
    p.add_argument("--no-downstream", action="store_true",
                   help="skip the spliced-model CE/KL metrics (reconstruction and sparsity only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.context_length=256 (repeatable)")
    return p


def run(args) -> int:
    import sys
    from pathlib import Path

    from jsae import outputs
    from jsae.evals.evaluate import evaluate_path

    path = Path(args.path)
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(args.json_path).parent if args.json_path else (
            path if path.is_dir() else path.parent) / "eval")
    json_path = Path(args.json_path) if args.json_path else out_dir / "eval.json"
    if args.out_dir:
        outputs.claim_folder(out_dir, OWNER, overwrite=True)  # files, not the folder, are claimed
    outputs.claim_file(json_path, OWNER, overwrite=args.overwrite,
                       recognise=outputs.json_with("metrics", "saebench"))
    outputs.claim_file(out_dir / "feature_density.png", OWNER, overwrite=args.overwrite,
                       recognise=lambda p: (p.parent / "eval.json").is_file())
    try:
        result = evaluate_path(
            args.path, n_tokens=args.tokens, downstream_tokens=args.downstream_tokens,
            batch_size=args.batch_size, model_name=args.model,
            hook=args.hook, json_path=args.json_path, out_dir=args.out_dir,
            downstream=not args.no_downstream, overrides=args.overrides,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if type(e).__name__ == "ConfigError":
            raise  # the CLI reports config errors itself
        print(f"jsae eval: {e}", file=sys.stderr)
        return 2
    for f in result.get("files", {}).values():
        outputs.record_file(f, OWNER)
    return 0


OWNER = "jsae eval"  # the command jsae.outputs records as the writer of eval.json and plots

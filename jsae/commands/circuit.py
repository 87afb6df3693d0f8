"""`jsae circuit RUN_OR_SET --prompt TEXT --out DIR`: the attribution graph of a prompt through a
model whose MLPs are replaced by transcoders (a set, one per layer) or a cross-layer transcoder:
circuit-tracer's graph JSON, feature-detail files, jsae's viewer page (graph.html) and, with
--intervene, the change in the top logits when features are set in the real model."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from jsae.commands._args import positive_int, probability

OWNER = "jsae circuit"
_INTERVENE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*@\s*(-?\d+)\s*=\s*(\S+)\s*")


def intervention(text: str) -> tuple[int, int, int, float]:
    """``L:F@POS=VALUE`` -> (layer, feature, position, value); a negative position counts from
    the prompt's end (-1: the last token)."""
    m = _INTERVENE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected LAYER:FEATURE@POSITION=VALUE (e.g. 3:1207@-1=0), got {text!r}")
    try:
        value = float(m.group(4))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value {m.group(4)!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be finite")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), value


def _threshold(text: str) -> float:
    from jsae.commands._args import finite_float

    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return v


def _slug(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"letters, digits, '.', '_' and '-' only (a file name), "
                                         f"got {text!r}")
    return text


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "circuit", help="attribution graph of a prompt through transcoders (circuit-tracer JSON + viewer)",
        description="Run PROMPT through the model with every MLP replaced by the run's transcoders "
        "(a set, one per layer) or its cross-layer transcoder, attention and normalisation frozen, "
        "and compute the direct effect of every active feature, error, and token on every feature "
        "and top logit. The graph is pruned to the nodes with NODE_THRESHOLD of the influence on "
        "the logits and the edges with EDGE_THRESHOLD, and written to OUT: <slug>.json in "
        "circuit-tracer's (and Neuronpedia's) graph schema, graph-metadata.json, "
        "features/<scan>/<index>.json from the atlas, circuit.json (scores, settings) and "
        "graph.html, jsae's viewer (open it from disk). OUT must be new, empty or an earlier "
        "`jsae circuit` folder (or --overwrite).")
    p.add_argument("run", metavar="RUN_OR_SET",
                   help="a training run of a transcoder set or a cross-layer transcoder, or a "
                   "circuit-tracer folder (config.yaml + safetensors, e.g. from jsae export)")
    p.add_argument("--prompt", required=True, help="the text to attribute (BOS is added)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target", metavar="TOKEN",
                   help="attribute this one token's logit (default: the top logits up to "
                   "--logit-prob, at most --max-logits)")
    p.add_argument("--max-logits", type=positive_int, default=10,
                   help="most logit targets (default 10)")
    p.add_argument("--logit-prob", type=probability, default=0.95,
                   help="logit targets up to this cumulative probability (default 0.95)")
    p.add_argument("--node-threshold", type=_threshold, default=0.8,
                   help="keep the nodes with this share of the influence (default 0.8)")
    p.add_argument("--edge-threshold", type=_threshold, default=0.98,
                   help="keep the edges with this share of the influence (default 0.98)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="target rows per attribution step (default 64)")
    p.add_argument("--intervene", type=intervention, action="append", default=[],
                   metavar="L:F@POS=VALUE",
                   help="also run the real model with feature F of layer L set to VALUE at "
                   "position POS (negative: from the end) and print the change in the top "
                   "logits (repeatable; all at once)")
    p.add_argument("--atlas", metavar="DIR",
                   help="the run's atlas (`jsae atlas`; default RUN/atlas, a member's RUN/atlas-NAME, "
                   "when it exists): "
                   "feature labels, detail files and card links")
    p.add_argument("--member", metavar="NAME",
                   help="of a run that trained a family of transcoder sets or cross-layer "
                   "transcoders: the member whose graph to compute")
    p.add_argument("--model", help="the model to load (default: the run's or the folder's)")
    p.add_argument("--slug", type=_slug, default="graph",
                   help="the graph's name and file name (default graph)")
    p.add_argument("--scan", help="the dictionaries' identifier in the graph (default: the "
                   "folder's name)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into OUT although it holds other files (only the circuit's files "
                   "are replaced; nothing else is removed)")
    return p


# ---- the dictionaries and the model


def load_dictionaries(path: Path, member: str | None = None):
    """(key -> SAE, key -> output hook or None, recorded model name or None) of a run (of a
    family: ``member``'s, keyed by its hooks) or a circuit-tracer folder."""
    from jsae import runs
    from jsae.errors import BadInput

    if runs.is_run(path):
        saes, outs, infos = runs.member_saes(path, member)
        recorded = next(reversed(infos.values())).get("model_name")
        try:
            mcfg = runs.model_section(path)
        except FileNotFoundError:
            mcfg = {}
        return saes, outs, mcfg.get("path") or mcfg.get("name") or recorded
    if member is not None:
        raise BadInput(f"--member {member!r}: {path} is not a jsae run (a family's members are "
                       "a run's)")
    if (path / "config.yaml").is_file():
        from jsae.export.circuit_tracer import load_circuit_tracer

        saes, meta = load_circuit_tracer(path)
        return saes, dict(meta["hook_names_out"]), meta.get("model_name")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or folder")
    raise BadInput(f"{path}: neither a jsae run (saes/) nor a circuit-tracer folder (config.yaml)")


def check_dictionaries(path, saes, outs, model_cfg) -> tuple[str, int]:
    """One line naming what does not fit a replacement model of ``model_cfg``; returns the kind
    (per layer or cross layer) and the features per layer."""
    from jsae.errors import BadInput
    from jsae.export.circuits import CROSS_LAYER, layer_site
    from jsae.runs import input_hooks
    from jsae.sae.archs import get_arch

    kinds = set()
    layers: list[int] = []
    for key, sae in saes.items():
        arch = get_arch(sae.spec.architecture)
        out = outs.get(key)
        if arch.circuit_export is None or not arch.transcoder or not out or out == key:
            raise BadInput(f"{path}: {key} is not a transcoder attribution can use; `jsae circuit` "
                           "needs a transcoder set (one ReLU/JumpReLU transcoder per layer, MLP "
                           "input to MLP output) or a cross-layer transcoder")
        kinds.add(arch.circuit_export)
        layers += [layer_site(h, "input hook")[0] for h in input_hooks(key)]
        if int(sae.spec.d_in) != int(model_cfg.d_model):
            raise BadInput(f"{path}: {key} reads {sae.spec.d_in}-dimensional inputs but the model "
                           f"has d_model {model_cfg.d_model}: transcoders of another model")
    if len(kinds) > 1 or (CROSS_LAYER in kinds and len(saes) > 1):
        raise BadInput(f"{path}: mixes per-layer and cross-layer transcoders; attribution takes "
                       "one set or one cross-layer transcoder")
    n = int(model_cfg.n_layers)
    beyond = sorted(L for L in set(layers) if L >= n)
    if beyond:
        raise BadInput(f"{path}: has transcoders for layer(s) {', '.join(map(str, beyond))} but "
                       f"the model has {n} layers: transcoders of another model")
    missing = sorted(set(range(n)) - set(layers))
    if missing:
        raise BadInput(f"{path}: no transcoder for layer(s) {', '.join(map(str, missing))} of the "
                       f"model's {n}; attribution replaces every MLP")
    first = next(iter(saes.values()))
    per_layer = int(first.spec.d_sae) // get_arch(first.spec.architecture).n_hooks(first.spec)
    return kinds.pop(), per_layer


def _same_model(a: str | None, b: str | None) -> bool:
    norm = lambda s: Path(str(s).rstrip("/")).name.lower().removesuffix(".gguf")  # noqa: E731
    return not a or not b or norm(a) == norm(b)


def load_model(name: str):
    """The language model ``name`` (a tests' seam: they hand a tiny one)."""
    from jsae.models import load

    return load(name)


def token_text(tokenizer, t: int) -> str:
    """One token's text as the tokenizer decodes it alone (special tokens kept, as
    circuit-tracer's ``tokenizer.decode(t)``)."""
    try:
        return tokenizer.decode([int(t)], skip_special_tokens=False)
    except TypeError:
        return tokenizer.decode([int(t)])


def target_id(tokenizer, text: str, vocab: int) -> int:
    from jsae.errors import BadInput

    ids = list(tokenizer.encode(text, add_bos=False))
    if len(ids) != 1 and hasattr(tokenizer, "token_to_id"):
        t = tokenizer.token_to_id(text)  # a raw vocabulary piece ("▁Paris")
        ids = [t] if t is not None else ids
    if len(ids) != 1 or not 0 <= int(ids[0]) < vocab:
        raise BadInput(f"--target {text!r} is not one token of the model's vocabulary (it encodes "
                       f"as {len(ids)} tokens); give a single token")
    return int(ids[0])


def resolve_interventions(wanted, n_layers: int, per_layer: int, n_pos: int) -> dict:
    from jsae.errors import BadInput

    out = {}
    for layer, f, pos, value in wanted:
        p = pos + n_pos if pos < 0 else pos
        text = f"{layer}:{f}@{pos}={value:g}"
        if layer >= n_layers:
            raise BadInput(f"--intervene {text}: layer {layer} does not exist (the model has "
                           f"{n_layers})")
        if f >= per_layer:
            raise BadInput(f"--intervene {text}: feature {f} does not exist (layer {layer} has "
                           f"{per_layer} features)")
        if not 0 <= p < n_pos:
            raise BadInput(f"--intervene {text}: position {pos} is outside the prompt's "
                           f"{n_pos} tokens (BOS included)")
        out[(layer, f, p)] = value
    return out


def _print_intervention(res: dict, tokenizer) -> None:
    """The real model's top tokens at the last position, clean and with the features set
    (``res["top"]``: rows of token, clean logit, new logit, clean probability, new one)."""
    print("intervention: the last position's top tokens, clean -> with the features set")
    for t, lc, ln, pc, pn in res["top"]:
        print(f"  {token_text(tokenizer, t)!r:>16}  logit {lc:8.3f} -> {ln:8.3f} ({ln - lc:+.3f})"
              f"  p {pc:.3f} -> {pn:.3f}")


# ---- the command


def run(args) -> int:
    import numpy as np

    from jsae import outputs
    from jsae.analysis.cli_utils import log
    from jsae.errors import BadInput
    from jsae.fileio import atomic_folder

    out = Path(args.out)
    outputs.claim_folder(out, OWNER, overwrite=args.overwrite)  # before any work
    if not args.prompt.strip():
        raise BadInput("--prompt is empty")
    path = Path(args.run)
    saes, outs, recorded = load_dictionaries(path, args.member)
    name = args.model or recorded
    if not name:
        raise BadInput(f"{path}: no model named in its config; give --model")
    if not _same_model(args.model, recorded):  # names differ (a path, a GGUF file...): the
        #                                          shapes below decide; say it
        import sys

        print(f"warning: {path} names its model {recorded}, not {args.model}; checking the "
              "transcoders' shapes against it", file=sys.stderr)
    log(f"loading {name} ...")
    model = load_model(name)
    cfg, tok = model.cfg, model.tokenizer
    kind, per_layer = check_dictionaries(path, saes, outs, cfg)
    tokens = np.asarray(tok.encode(args.prompt, add_bos=True), np.int32)
    if len(tokens) > cfg.max_position:
        raise BadInput(f"--prompt has {len(tokens)} tokens; the model's context is "
                       f"{cfg.max_position}")
    if len(tokens) < 2:
        raise BadInput("--prompt has no token after BOS")
    target = target_id(tok, args.target, cfg.vocab_size) if args.target is not None else None
    interventions = resolve_interventions(args.intervene, cfg.n_layers, per_layer, len(tokens))
    default = path / ("atlas" if args.member is None else f"atlas-{args.member}")  # `jsae atlas`'s
    atlas_dir = Path(args.atlas) if args.atlas else (default if default.is_dir() else None)
    atlas = None
    if atlas_dir is not None:
        from jsae.circuits.files import read_atlases
        from jsae.export.circuits import CROSS_LAYER

        atlas = read_atlases(atlas_dir, features_per_layer=per_layer, cross_layer=kind == CROSS_LAYER)
        if atlas is None and args.atlas:
            raise BadInput(f"--atlas {atlas_dir}: no atlas there (atlas-L<layer>.npz or atlas.npz; "
                           "build one with jsae atlas)")

    from jsae.circuits import attribute, graph_scores, intervene, prune

    scan = args.scan or path.resolve().name
    graph = attribute(model, saes, args.prompt, outputs=outs,
                      target_tokens=None if target is None else [target],
                      max_logits=args.max_logits, logit_prob=args.logit_prob,
                      batch_size=args.batch_size, progress=True, scan=scan)
    pr = prune(graph, args.node_threshold, args.edge_threshold)
    replacement, completeness = graph_scores(graph)
    toks = [token_text(tok, t) for t in np.asarray(graph.tokens).tolist()]
    logit_toks = [token_text(tok, t) for t in np.asarray(graph.logit_tokens).tolist()]
    summary = {
        "prompt": args.prompt, "tokens": toks, "run": str(path), "model": str(name),
        "scan": scan, "logit_targets": logit_toks,
        "logit_probabilities": np.asarray(graph.logit_probabilities).tolist(),
        "replacement_score": float(replacement), "completeness_score": float(completeness),
        "node_threshold": args.node_threshold, "edge_threshold": args.edge_threshold,
        "active_features": graph.n_features,
    }
    if interventions:
        res = intervene(model, saes, args.prompt, interventions, outputs=outs)
        _print_intervention(res, tok)
        summary["interventions"] = {
            "set": [[k[0], k[1], k[2], v] for k, v in interventions.items()],
            "top": [[token_text(tok, r[0]), *r[1:]] for r in res["top"]]}
    from jsae.circuits.files import write_circuit

    with atomic_folder(out, owner=OWNER) as tmp:
        doc = write_circuit(tmp, graph, node_mask=pr.node_mask, edge_mask=pr.edge_mask,
                            cumulative_scores=pr.cumulative_scores, token_strings=toks,
                            logit_strings=logit_toks, slug=args.slug,
                            node_threshold=args.node_threshold, atlas=atlas,
                            page_dir=out.resolve(), summary=summary)
    print(f"{graph.n_features} active features; kept {len(doc['nodes'])} nodes and "
          f"{len(doc['links'])} links; replacement score {summary['replacement_score']:.3f}, "
          f"completeness {summary['completeness_score']:.3f}")
    print(f"wrote {out / (args.slug + '.json')} and {out / 'graph.html'} (open it in a browser)")
    return 0

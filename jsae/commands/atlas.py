"""`jsae atlas RUN_DIR --tokens N --out DIR`: every feature's card, neighbours and a map, as a
static site (open DIR/index.html); `--around F --radius R` adds the local map of a feature.
On a transcoder set or a dictionary whose features are grouped by layer (a cross-layer
transcoder), without --hook: every layer's features from one pass, one site with a layer
selector (DIR/atlas-L<layer>.npz per layer). A family member (--hook HOOK@NAME) is atlased
like any dictionary; `--families families.json` adds each feature's parent and children in the
next smaller and larger members (`jsae families`), linked to their atlases (--family-atlas)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "atlas", help="build the feature atlas: cards, neighbours, maps, a static site",
        description="One streaming pass over text through the LM gathers, for every feature, its "
        "density, histogram, top contexts and quantile-band samples; then logit effects, decoder "
        "and co-activation neighbours, automatic labels and a UMAP map. Writes DIR/index.html "
        "(works from file://), DIR/atlas.npz, DIR/map.png. With --around F on an existing atlas, "
        "only the local map of F is computed (no LM pass).")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--out", help="output folder (default RUN_DIR/atlas; a family member's: "
                   "RUN_DIR/atlas-NAME)")
    p.add_argument("--hook", help="hook point, or a family member's key HOOK@NAME (default: "
                   "the run's first hook; on a set or a cross-layer transcoder, every layer in "
                   "one site with a layer selector)")
    p.add_argument("--member", metavar="NAME",
                   help="of a family of transcoder sets or cross-layer transcoders: the member "
                   "whose layers to atlas (default --out: RUN_DIR/atlas-NAME)")
    p.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to scan (default 200000)")
    p.add_argument("--text", action="append", default=[], metavar="GLOB",
                   help="read the corpus from these .txt/.jsonl files (repeatable; default: the "
                   "offline corpus of Wikipedia summaries and State of the Union speeches)")
    p.add_argument("--cache", metavar="DIR", nargs="?", const="",
                   help="read activations and context tokens from a `jsae harvest` folder (its "
                        "held-out split) instead of running the LM over text; without DIR: the "
                        "run's own cache (data.source: cache, data.path)")
    p.add_argument("--context-length", type=int, default=128, help="tokens per context (default 128)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="contexts per LM pass and atlas update (default 32)")
    p.add_argument("--top-k", type=int, default=16, help="top contexts kept per feature (default 16)")
    p.add_argument("--window", type=int, default=24, help="tokens shown per example (default 24)")
    p.add_argument("--bands", type=int, default=10, help="quantile bands (default 10)")
    p.add_argument("--band-samples", type=int, default=4, help="samples per band (default 4)")
    p.add_argument("--neighbours", type=int, default=10, help="neighbours per feature (default 10)")
    p.add_argument("--around", type=int, action="append", default=[],
                   help="feature id whose local map to add (repeatable)")
    p.add_argument("--radius", type=float, default=0.3,
                   help="local map radius as a decoder cosine distance 1 - cos (default 0.3)")
    p.add_argument("--map", choices=["umap", "pca", "none"], default="umap",
                   help="layout of the global map (default umap; needs jsae[atlas])")
    p.add_argument("--rebuild", action="store_true",
                   help="with --around: rebuild the atlas even if DIR/atlas.npz exists")
    p.add_argument("--fresh", action="store_true", help="ignore a saved partial pass")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out although it holds files the atlas did not write "
                   "(only the atlas's own files are replaced; nothing else is removed)")
    p.add_argument("--neuronpedia", metavar="DIR", help="also export Neuronpedia batch-N.json files")
    p.add_argument("--explainer", metavar="URL",
                   help="OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) that writes "
                   "explanations; key from $OPENAI_API_KEY")
    p.add_argument("--explainer-model", default="default", help="model name sent to the explainer")
    p.add_argument("--explain", type=int, default=50,
                   help="features to explain, the most frequent live ones first (default 50)")
    p.add_argument("--families", metavar="FAMILIES.json",
                   help="`jsae families` output over this dictionary and others of its hook: "
                   "each card shows its parent in the next smaller dictionary and its children "
                   "in the next larger one, and the map can colour a feature's siblings")
    p.add_argument("--family-atlas", action="append", default=[], metavar="NAME=DIR",
                   help="with --families: the atlas of the dictionary NAME (its folder's name "
                   "in families.json, e.g. a family member's) is in DIR; the family row links "
                   "to its cards (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _paths(args):
    from pathlib import Path

    from jsae.runs import split_member

    member = split_member(args.hook)[1] if args.hook else args.member
    default = "atlas" if member is None else f"atlas-{member}"  # members do not share one
    out = Path(args.out) if args.out else Path(args.run_dir) / default
    return out, out / "atlas.npz"


def _load_sae(run_dir, hook):
    """(SAE, key) of ``hook`` (default: the run's first), as `jsae.runs.sae_from_run` reads it
    (a family member's ``saes/<hook>/<name>/``; a later checkpoint when there is one)."""
    from pathlib import Path

    from jsae.runs import run_hooks, sae_from_run

    hooks = run_hooks(run_dir)
    if not hooks:
        raise FileNotFoundError(f"{run_dir}: no saved SAEs under {Path(run_dir) / 'saes'} "
                                "(train first: jsae train CONFIG)")
    hook = hook or hooks[0]
    if hook not in hooks:
        raise FileNotFoundError(f"{run_dir}: no SAE for hook {hook!r}; saved: {', '.join(hooks)}")
    return sae_from_run(run_dir, hook)[0], hook


def _family_links(args, sae, hook, out):
    """The --families links of this dictionary (read and checked before any work), or None."""
    from pathlib import Path

    from jsae.analysis.atlas.family import family_links, parse_family_atlases
    from jsae.analysis.atlas.stream import AtlasError
    from jsae.runs import sae_dirname

    atlases = parse_family_atlases(args.family_atlas)
    if not args.families:
        if atlases:
            raise AtlasError("--family-atlas needs --families FAMILIES.json")
        return None
    run = Path(args.run_dir)
    return family_links(args.families, hook=hook, d_sae=sae.spec.d_sae, out=out,
                        folders=[run / "saes" / sae_dirname(hook), run], atlases=atlases)


OWNER = "jsae atlas"  # what jsae.outputs records as the writer of the atlas folder


def _is_older_atlas(out) -> bool:
    """An atlas folder written before jsae.outputs' marker existed."""
    return (out / "atlas.npz").is_file() or (out / "data" / "atlas.js").is_file() or (
        out / "state").is_dir() and not any(p for p in out.iterdir() if p.name not in (
            "state", "explain_cache", "atlas.npz", "map.png", "index.html", "atlas.js",
            "atlas.css", "data") and not p.name.startswith(("local_", "around-")))


def _write_outputs(data, out, sae, args, log, model=None) -> None:
    from jsae import outputs
    from jsae.analysis.atlas.build import save_atlas
    from jsae.analysis.atlas.maps import plot_global, plot_local

    save_atlas(data, out / "atlas.npz")
    written = ["atlas.npz"]
    if args.map != "none" and (data.map_xy == data.map_xy).any():
        plot_global(data, out / "map.png")
        written.append("map.png")
    labels = dict(zip(data.feature_ids.tolist(), data.labels))
    for lm in data.local_maps:
        plot_local(lm, out / f"local_{lm.center}.png", labels)
        written.append(f"local_{lm.center}.png")
    outputs.record(out, OWNER, written)
    try:
        from jsae.analysis.atlas.site import write_site
    except ImportError:  # the site writer is optional for the data products
        write_site = None
    if write_site is not None:
        index = write_site(out, data)
        log(f"site: {index}  (open it in a browser, or python -m http.server -d {out})")
    if args.neuronpedia:
        from pathlib import Path

        import numpy as np

        from jsae.analysis.atlas.neuronpedia import export_bulk, export_neuronpedia
        from jsae.analysis.logits import feature_directions

        if model is None:  # the logit histograms need the unembedding
            from jsae.analysis.run import load_run

            model = load_run(args.run_dir, data.meta.get("hook")).model
        vectors = feature_directions(sae, np.arange(sae.spec.d_sae))
        files = export_neuronpedia(data, args.neuronpedia, vectors=vectors, logit_hist=(model, sae))
        bulk = export_bulk(files, Path(args.neuronpedia) / "bulk")
        outputs.record(args.neuronpedia, "jsae atlas --neuronpedia",
                       [*(Path(f).name for f in files), "bulk/"])
        log(f"neuronpedia: {len(files)} batch files in {args.neuronpedia}; bulk-import folder {bulk}")


def _describe_local(data, lm) -> str:
    lines = [f"local map of feature {lm.center} ({data.labels[data.row(lm.center)]!r}): "
             f"{len(lm.ids)} features within cosine distance {lm.radius:.2f}, "
             f"{len(lm.cluster_labels)} clusters"]
    for c, lab in sorted(lm.cluster_labels.items()):
        members = lm.ids[lm.cluster == c]
        lines.append(f"  cluster {c} ({len(members)}): {lab}  e.g. "
                     + ", ".join(f"{int(i)} {data.labels[data.row(int(i))]!r}" for i in members[:4]))
    return "\n".join(lines)


def _run_layers(args, plan, model, cfg, state_dir, texts, cache, out, log) -> int:
    """Every layer's atlas from one pass, one site with a layer selector."""
    from jsae import outputs
    from jsae.analysis.atlas.build import save_atlas
    from jsae.analysis.atlas.layers import layer_atlases
    from jsae.analysis.atlas.site import write_layer_site

    layers = layer_atlases(args.run_dir, model=model, tokens=args.tokens,
                           context_length=args.context_length, cfg=cfg, batch_size=args.batch_size,
                           n_neighbours=args.neighbours, maps=args.map != "none", seed=args.seed,
                           state_dir=state_dir, texts=texts, cache=cache, plan=plan,
                           map_method="pca" if args.map == "pca" else "umap")
    names = []
    for la in layers:
        save_atlas(la.data, out / f"atlas-L{la.layer}.npz")
        names.append(f"atlas-L{la.layer}.npz")
    outputs.record(out, OWNER, names)
    index = write_layer_site(out, layers)
    log(f"site: {index}  (open it in a browser, or python -m http.server -d {out})")
    for la in layers:
        d = la.data
        print(f"layer {la.layer} ({la.hook}): {int((d.density > 0).sum())} of {d.n_features} "
              f"features fired on {d.meta['n_tokens']:,} tokens")
    print(f"atlas of {len(layers)} layers; wrote {out}")
    return 0


def run(args) -> int:
    from jsae import outputs
    from jsae.analysis.atlas.build import add_local_map, atlas, load_atlas
    from jsae.analysis.atlas.stream import AtlasError, StreamConfig
    from jsae.analysis.cli_utils import log

    if args.member and args.hook:
        raise AtlasError("give --hook HOOK@NAME (one dictionary) or --member NAME (a member's "
                         "layers), not both")
    out, npz = _paths(args)
    if args.tokens <= 0:
        raise AtlasError(f"--tokens must be positive, got {args.tokens}")
    outputs.claim_folder(out, OWNER, overwrite=args.overwrite, recognise=_is_older_atlas)
    if args.neuronpedia:
        outputs.claim_folder(args.neuronpedia, "jsae atlas --neuronpedia", overwrite=args.overwrite)
    if args.around and npz.exists() and not args.rebuild:
        sae, hook = _load_sae(args.run_dir, args.hook)
        links = _family_links(args, sae, hook, out)
        data = load_atlas(npz)
        if data.meta.get("hook") != hook or data.meta.get("d_sae") != sae.spec.d_sae:
            raise AtlasError(f"{npz} is an atlas of {data.meta.get('hook')} with "
                             f"{data.meta.get('d_sae')} features, not of this run's {hook} "
                             f"({sae.spec.d_sae}); use --rebuild or another --out")
        method = "pca" if args.map == "pca" else "umap"
        if links is not None:
            from jsae.analysis.atlas.family import attach

            attach(data, links)
        for f in args.around:
            lm = add_local_map(data, sae, f, args.radius, seed=args.seed, method=method)
            print(_describe_local(data, lm))
        _write_outputs(data, out, sae, args, log)
        log(f"wrote {out}/local_{args.around[-1]}.png and {npz}")
        return 0
    plan = None
    if not args.hook:
        from jsae.analysis.atlas.layers import layer_plan

        _load_sae(args.run_dir, None)  # a run without a dictionary: its one-line error first
        plan = layer_plan(args.run_dir, args.member)
        extra = [f for f, v in (("--around", args.around), ("--neuronpedia", args.neuronpedia),
                                ("--explainer", args.explainer), ("--families", args.families),
                                ("--family-atlas", args.family_atlas))
                 if v]
        if plan is None and args.member:
            raise AtlasError(f"--member {args.member!r}: {args.run_dir} is not a family of "
                             "transcoder sets or cross-layer transcoders; a member of a family "
                             "of SAEs is --hook HOOK@NAME")
        if plan is not None and extra:
            raise AtlasError(f"{' and '.join(extra)} take one dictionary's atlas; {args.run_dir} "
                             "has several layers: add --hook KEY (one of its saes/)")
    cfg = StreamConfig(top_k=args.top_k, window=min(args.window, args.context_length),
                       bands=args.bands, band_samples=args.band_samples)
    state_dir = out / "state"
    links = None
    if plan is None:
        sae, key = _load_sae(args.run_dir, args.hook)  # fail on a run without an SAE before the LM loads
        links = _family_links(args, sae, key, out)  # a wrong families file: before any work
    owned = outputs.marked_files(out, OWNER)
    if args.fresh and state_dir.exists() and ("state/" in owned or _is_older_atlas(out)):
        import shutil

        shutil.rmtree(state_dir)
    elif state_dir.exists() and "state/" not in owned and not _is_older_atlas(out):
        raise AtlasError(f"{state_dir} was not written by jsae atlas; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    outputs.record(out, OWNER, ["state/"])  # the partial pass is the atlas's from now on
    texts = None
    if args.text:
        from jsae.data.text import FileDocuments

        docs = FileDocuments(args.text)
        texts = [docs[i] for i in range(len(docs))]
    cache = args.cache
    if cache == "":
        from jsae.runs import run_config

        d = run_config(args.run_dir).get("data", {})
        if d.get("source") != "cache" or not d.get("path"):
            raise AtlasError(f"{args.run_dir} was not trained from a cache (data.source: "
                             f"{d.get('source')!r}); give the harvest folder: --cache DIR")
        cache = d["path"]
    log(f"loading {args.run_dir} ...")
    from jsae.analysis.run import load_run

    model = load_run(args.run_dir, next(iter(plan.saes)) if plan else key).model
    if plan is not None:
        return _run_layers(args, plan, model, cfg, state_dir, texts, cache, out, log)
    data = atlas(args.run_dir, hook=key, model=model, tokens=args.tokens,
                 context_length=args.context_length, cfg=cfg, batch_size=args.batch_size,
                 n_neighbours=args.neighbours, maps=args.map != "none", around=args.around,
                 radius=args.radius, seed=args.seed, state_dir=state_dir, texts=texts,
                 map_method="pca" if args.map == "pca" else "umap", cache=cache)
    if links is not None:
        from jsae.analysis.atlas.family import attach

        attach(data, links)
    if args.explainer:
        from jsae.analysis.atlas.explain import ChatClient, explain_atlas

        outputs.record(out, OWNER, ["explain_cache/"])
        client = ChatClient(args.explainer, model=args.explainer_model, cache_dir=out / "explain_cache")
        explain_atlas(data, client, n_features=args.explain, seed=args.seed)
    _write_outputs(data, out, sae, args, log, model)
    live = int((data.density > 0).sum())
    print(f"atlas of {data.meta['hook']}: {live} of {data.n_features} features fired on "
          f"{data.meta['n_tokens']:,} tokens; {len(data.cluster_labels)} clusters; wrote {out}")
    from jsae.analysis.atlas.structure import describe, structure

    print(describe(structure(data)))
    if links is not None:
        print(_describe_family(links))
    for lm in data.local_maps:
        print(_describe_local(data, lm))
    return 0


def _describe_family(links) -> str:
    m = links.meta
    parts = []
    if links.parent is not None:
        parts.append(f"{int((links.parent >= 0).sum())} of its features have a parent in "
                     f"{m['parent']['name']} ({m['parent']['d_sae']:,} features)")
    if links.children is not None:
        parts.append(f"{int((links.children >= 0).any(1).sum())} have children in "
                     f"{m['children']['name']} ({m['children']['d_sae']:,} features)")
    linked = [s["name"] for s in (m["parent"], m["children"]) if s and s["href"]]
    return (f"families from {m['file']} ({m['this']['name']}): " + "; ".join(parts)
            + (f"; linked to the atlases of {', '.join(linked)}" if linked else ""))

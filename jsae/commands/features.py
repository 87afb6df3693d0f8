"""`jsae features RUN_DIR --search TEXT` (or `--feature I`): features with their top-activating
snippets over the offline corpus and their logit effects."""

from __future__ import annotations

import argparse

from jsae.commands._args import nonneg_int, positive_int
from jsae.errors import BadInput


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "features", help="search features by text; show snippets and logit effects",
        description="List the features that fire most on the tokens of a text (--search), or "
        "describe given features (--feature): top-activating snippets from a sample of the offline "
        "corpus (activating token marked) and the tokens the decoder direction promotes/suppresses.")
    p.add_argument("run_dir", help="training run folder (config.yaml + saes/<hook>/)")
    p.add_argument("--search", help="text whose tokens the features should fire on")
    p.add_argument("--feature", type=nonneg_int, action="append", default=[], help="feature id (repeatable)")
    p.add_argument("--image", action="append", default=[],
                   help="an image file (repeatable; multimodal Gemma 3 runs): list the features that fire "
                   "on its soft tokens and write PNGs with those tokens highlighted to RUN_DIR/analysis/images")
    p.add_argument("--images", metavar="FOLDER",
                   help="with a multimodal run: also show each listed feature's top-activating images "
                   "among FOLDER's images ('skimage': scikit-image's photographs), as highlighted PNGs")
    p.add_argument("--hook", help="hook point (default: the run's first hook)")
    p.add_argument("--top", type=positive_int, default=8, help="features listed for --search (default 8)")
    p.add_argument("--snippets", type=positive_int, default=5, help="snippets per feature (default 5)")
    p.add_argument("--logits", type=nonneg_int, default=8, help="logit-effect tokens per side (default 8)")
    p.add_argument("--rank", choices=["auto", "specific", "max", "mean"], default="auto",
                   help="search ranking (default auto: specific, see jsae.analysis.rank_scores)")
    p.add_argument("--contexts", type=positive_int, default=1024,
                   help="corpus contexts (64 tokens) scanned; cached in RUN_DIR/analysis (default 1024)")
    p.add_argument("--logit-vocab", choices=["corpus", "all"], default="corpus",
                   help="rank logit effects among the tokens seen in the corpus sample (default), "
                   "or the whole vocabulary (rare tokens with poorly trained embeddings then dominate)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    return p


def describe(model, sae, feature: int, corpus, contexts, *, snippets: int, logits: int, style: str,
             header: str = "", vocab=None, key: str | None = None) -> str:
    """Text block for one feature: frequency, logit effects, snippets (``key``: the run's
    dictionary key; a crosscoder's names the hooks of its layer profile)."""
    from jsae.analysis.cli_utils import token_repr
    from jsae.analysis.logits import logit_effects
    from jsae.analysis.render import render_snippets

    tok = model.tokenizer
    row = corpus.row(feature)
    lines = [f"feature {feature}{header}  |  fires on {100 * corpus.frequency[row]:.3f}% of corpus tokens, "
             f"max {corpus.max[row]:.2f}"]
    from jsae.sae.archs import get_arch

    profile = get_arch(sae.spec.architecture).layer_profile(sae)  # where the feature writes
    if profile is not None:
        prof = profile[feature]
        from jsae.runs import input_hooks

        hooks = input_hooks(key) if key else [f"hook {i}" for i in range(len(prof))]
        lines.append("  writes to:  " + "  ".join(f"{h} {100 * v:.0f}%"
                                                 for h, v in zip(hooks, prof)))
    le = logit_effects(model, sae, [feature], k=logits, vocab=vocab)
    lines.append("  promotes:   " + " ".join(token_repr(tok, i) for i in le.top_ids[0]))
    lines.append("  suppresses: " + " ".join(token_repr(tok, i) for i in le.bottom_ids[0]))
    snips = render_snippets(tok, contexts, corpus, feature, n=snippets, left=12, right=4, style=style)
    lines.append("  top-activating snippets:" if snips else "  (did not fire on the corpus sample)")
    lines += ["    " + s for s in snips]
    return "\n".join(lines)


def run(args) -> int:
    from jsae.analysis.cli_utils import log, use_color
    from jsae.analysis.render import highlight
    from jsae.analysis.run import corpus_stats, load_run
    from jsae.analysis.search import search_features

    if not args.search and not args.feature and not args.image:
        raise BadInput("give --search TEXT, --feature I or --image FILE")
    style = "ansi" if use_color(args.color) else "plain"
    log(f"loading {args.run_dir} ...")
    r = load_run(args.run_dir, args.hook)
    corpus, contexts = corpus_stats(r, args.contexts, log=log)
    vocab = None
    if args.logit_vocab == "corpus":
        import numpy as np

        tok = r.model.tokenizer
        specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
        vocab = np.setdiff1d(np.unique(contexts), specials)
    kw = dict(snippets=args.snippets, logits=args.logits, style=style, vocab=vocab, key=r.hook)
    if args.search:
        res = search_features(r.model, r.sae, r.hook, args.search, k=args.top, corpus=corpus, rank=args.rank)
        from jsae.analysis.render import token_pieces

        pieces = token_pieces(r.model.tokenizer, res.ids)
        print(f"features at {r.hook} that fire on {args.search!r} (ranked {args.rank}; "
              f"corpus: {len(contexts)} contexts x {contexts.shape[1]} tokens)\n")
        for j, f in enumerate(res.features):
            fired = [t for t in range(len(res.ids)) if res.counted[t] and res.codes[t, j] > 0]
            on = highlight(pieces, [(t, t + 1) for t in fired], style=style)
            hdr = f"  score {res.scores[j]:.3g}, max on text {res.text_max[j]:.2f}"
            print(describe(r.model, r.sae, int(f), corpus, contexts, header=hdr, **kw))
            print(f"  on the text: {on}\n")
        if not len(res.features):
            print("no feature fires on that text")
    for path in args.image:
        _image_features(r, path, corpus, contexts, args.top, kw)
    for f in args.feature:
        if not 0 <= f < r.sae.spec.d_sae:
            raise BadInput(f"feature {f} out of range (the SAE has {r.sae.spec.d_sae})")
        print(describe(r.model, r.sae, f, corpus, contexts, **kw) + "\n")
    if args.images and args.feature:
        _top_images(r, args.images, args.feature)
    return 0


def _top_images(r, spec: str, features) -> None:
    """`--images`: each feature's top-activating images among a folder's, with PNGs."""
    from pathlib import Path

    from jsae.analysis.images import render_feature, top_images
    from jsae.data.images import open_images

    items = open_images(spec)
    res = top_images(r.model, r.sae, r.hook, [it.image for it in items], features)
    out = Path(r.path) / "analysis" / "images"
    for j, f in enumerate(res.features):
        print(f"feature {int(f)}: top-activating images among {len(items)} ({spec})")
        for i, mx, soft in zip(res.images[j], res.max[j], res.soft[j]):
            name = items[i].name or str(i)
            png = render_feature(r.model, items[i].image, soft, out / f"top_f{int(f)}_{name}.png")
            print(f"    {mx:6.2f}  {name}  {png}")
        print()


def _image_features(r, path, corpus, contexts, top: int, kw) -> None:
    """`--image`: the features firing on an image's soft tokens, each with a highlighted PNG."""
    from pathlib import Path

    from jsae.analysis.images import features_on_image, render_feature

    res = features_on_image(r.model, r.sae, r.hook, path, top=top)
    M = res.codes.shape[0]
    print(f"features at {r.hook} that fire on the image {path} ({M} soft tokens; ranked by max)\n")
    out = Path(r.path) / "analysis" / "images"
    for f, mx, n in zip(res.features, res.max, res.n_tokens):
        png = render_feature(r.model, path, res.codes[:, f], out / f"{Path(path).stem}_f{int(f)}.png")
        hdr = f"  max on image {mx:.2f}, fires on {int(n)}/{M} soft tokens"
        print(describe(r.model, r.sae, int(f), corpus, contexts, header=hdr, **kw))
        print(f"  on the image: {png}\n")
    if not len(res.features):
        print("no feature fires on that image")

"""Multilingual concepts: features that recognise the same concept (France, Frankreich, Francia) in several languages with different tokens.

The lexicon (``jsae.bench._lexicon``): CLDR names from ``babel`` of 40 countries, 24 languages,
12 months and 7 weekdays in 13 languages (en fr es de it pt nl sv pl ru tr ja zh), each name in
three matched template sentences per language. Every sentence goes through the LM and the
dictionary at the run's hook; a feature's score on a sentence is its largest code over the
name's tokens (the tokens of the name, plus the one it shares with the template where a token
straddles the boundary).

Per feature ``f``, concept ``c`` and language ``l`` (within ``c``'s category):

- pooled AUROC: ``c``'s sentences in every language against the other concepts' sentences in
  every language (the Mann-Whitney statistic, ties counted half);
- ``f`` **works** for ``c`` in ``l`` when, among ``l``'s sentences, its AUROC for ``c`` against the
  category's other concepts is at least ``--languages-auroc`` (0.9), it fires on at least half of
  ``c``'s sentences and on at most ``--languages-max-negative`` (0.1) of the other concepts'
  sentences (so a feature that fires on every country name does not count);
- a language has **distinct tokens** for ``c`` when the token ids of ``c``'s name there (over its
  three sentences) share none with the English name's ("Frankreich" does, "France" in French
  does not: a match on the same tokens says nothing about concepts).

A **concept feature** works for some concept in some language; its concept is the one it works
for in the most languages. It is **cross-lingual** when it works in English and in at least
``--languages-min-distinct`` (1) other languages with distinct tokens. Reported: the number and
share of concept features that are cross-lingual, per category and in all; the histogram of the
number of distinct-token languages; per language, the share of English concept features that
also work there; the share of concepts with a cross-lingual feature; and a chance level, the same
share after each non-English language's concepts are permuted (a derangement), so "works for
France in English and for Japan in German" is what the control counts.

The claim that a dictionary's features are about concepts holds where the cross-lingual share
clearly exceeds its control, and it holds for the languages (details) where transfer from English
is high. The LM's activations carry some of it without any dictionary: ``--languages-baseline``
measures the same dictionary with random encoder directions (same column norms, biases and
decoder), and a learned dictionary should beat that too. Measure several layers with a run per layer (or a run with several hooks)::

    for L in 3 6 9 12; do
      jsae bench runs/multi --hook blocks.$L.hook_resid_post --only languages --json lang-L$L.json
    done
"""

from __future__ import annotations

EVAL_TYPE_ID = "multilingual_concepts"


def add_arguments(group) -> None:
    from jsae.bench._lexicon import CATEGORIES, LANGS

    group.add_argument("--languages-langs", default=",".join(LANGS),
                       help=f"comma-separated languages, en included (default {','.join(LANGS)})")
    group.add_argument("--languages-categories", default=",".join(CATEGORIES),
                       help=f"comma-separated concept categories (default {','.join(CATEGORIES)})")
    group.add_argument("--languages-auroc", type=float, default=0.9,
                       help="within-language AUROC at which a feature works for a concept (default 0.9)")
    group.add_argument("--languages-max-negative", type=float, default=0.1,
                       help="largest share of the other concepts' sentences a working feature may fire on "
                            "(default 0.1)")
    group.add_argument("--languages-baseline", action="store_true",
                       help="also measure the dictionary with random encoder directions (same norms and "
                            "biases): how much of the result the LM's activations give without learning "
                            "(a second pass, about as long as the first)")
    group.add_argument("--languages-min-distinct", type=int, default=1,
                       help="distinct-token languages besides English a cross-lingual feature must work in "
                            "(default 1)")


def _choice(value: str, allowed, opt: str) -> list[str]:
    from jsae.bench import choices

    return choices(value, allowed, opt)


def check_arguments(args) -> None:
    import math

    from jsae.bench._lexicon import CATEGORIES, LANGS
    from jsae.config import ConfigError

    langs = _choice(args.languages_langs, LANGS, "--languages-langs")
    if "en" not in langs or len(langs) < 2:
        raise ConfigError(f"--languages-langs must include en (the reference) and another language; "
                          f"got {args.languages_langs!r}")
    _choice(args.languages_categories, CATEGORIES, "--languages-categories")
    if not (0.5 < args.languages_auroc <= 1):
        raise ConfigError(f"--languages-auroc must be in (0.5, 1]; got {args.languages_auroc}")
    if not (math.isfinite(args.languages_max_negative) and 0 <= args.languages_max_negative < 1):
        raise ConfigError(f"--languages-max-negative must be in [0, 1); got {args.languages_max_negative}")
    if not (1 <= args.languages_min_distinct < len(langs)):
        raise ConfigError(f"--languages-min-distinct must be in [1, {len(langs) - 1}] for {len(langs)} "
                          f"languages; got {args.languages_min_distinct}")


# ---------------------------------------------------------------------------------------------
# sentences and name spans


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def name_span(tokenizer, prefix: str, name: str, suffix: str) -> tuple[list[int], int, int]:
    """``(ids, start, end)``: the sentence's token ids and the token range ``[start, end)`` that
    holds the name (a token straddling the name's start or end is included)."""
    full = list(tokenizer.encode(prefix + name + suffix))
    start = _common_prefix(full, tokenizer.encode(prefix))
    with_name = list(tokenizer.encode(prefix + name))
    end = _common_prefix(full, with_name)
    if end < len(with_name):
        end += 1  # the name's last token merged with the suffix
    return full, start, max(end, start + 1)


def build_sentences(tokenizer, lexicon: dict, langs) -> dict:
    """The sentences of every category laid out ``[concept, language, template]`` (C-order):
    ``{category: {"concepts", "ids", "spans", "name_tokens" ({(c, lang): set of ids})}}``."""
    from jsae.bench._lexicon import TEMPLATES, sentence

    out = {}
    for cat, rows in lexicon.items():
        ids, spans, toks = [], [], {}
        for c, by_lang in rows.items():
            for lang in langs:
                seen = set()
                for tpl in TEMPLATES[lang][cat]:
                    full, a, b = name_span(tokenizer, *sentence(tpl, by_lang[lang]))
                    ids.append(full)
                    spans.append((a, b))
                    seen.update(full[a:b])
                toks[c, lang] = seen
        out[cat] = {"concepts": list(rows), "ids": ids, "spans": spans, "name_tokens": toks}
    return out


def _span_max(sae, acts, mask):
    """Largest code of every feature over the masked (name) tokens: ``[B, F]``."""
    import jax.numpy as jnp

    from jsae.sae.core import encode

    z = encode(sae, acts)
    return {"max": jnp.where(mask[..., None], z, -jnp.inf).max(1)}


# ---------------------------------------------------------------------------------------------
# per-feature statistics (NumPy)


def grouped_auroc(values, groups, n_groups: int):
    """AUROC of every column of ``values [N, F]`` for each group against the other rows:
    ``[n_groups, F]`` (ranks once, ties counted half; every group needs rows on both sides)."""
    import numpy as np

    from jsae.concepts import average_ranks

    r = average_ranks(values)
    g = np.asarray(groups)
    n = len(g)
    out = np.empty((n_groups, r.shape[1]))
    for k in range(n_groups):
        pos = g == k
        n1 = int(pos.sum())
        out[k] = (r[pos].sum(0) - n1 * (n1 + 1) / 2) / (n1 * (n - n1))
    return out


def category_stats(x, *, auroc_min: float, max_negative: float) -> dict:
    """``x [C, L, T, F]`` (a feature's score per concept, language, template) ->
    ``pooled [C, F]`` AUROC over every language, ``auroc [C, L, F]`` within each language,
    ``pos_rate`` / ``neg_rate [C, L, F]`` firing shares, ``works [C, L, F]`` (module doc)."""
    import numpy as np

    C, L, T, F = x.shape
    fires = (x > 0).sum(2)  # [C, L, F]
    pos_rate = fires / T
    neg_rate = (fires.sum(0, keepdims=True) - fires) / ((C - 1) * T)
    # a feature that never fires on the category ranks every sentence equal: AUROC 0.5 (skipped)
    act = np.flatnonzero(fires.any((0, 1)))
    pooled, per = np.full((C, F), 0.5), np.full((C, L, F), 0.5)
    for a in range(0, len(act), 1024):  # column chunks bound the rank arrays' memory
        cols = act[a: a + 1024]
        xa = x[..., cols]
        pooled[:, cols] = grouped_auroc(xa.reshape(C * L * T, -1), np.repeat(np.arange(C), L * T), C)
        for li in range(L):
            per[:, li, cols] = grouped_auroc(xa[:, li].reshape(C * T, -1), np.repeat(np.arange(C), T), C)
    works = (per >= auroc_min) & (pos_rate >= 0.5) & (neg_rate <= max_negative)
    return {"pooled": pooled, "auroc": per, "pos_rate": pos_rate, "neg_rate": neg_rate, "works": works}


def feature_concepts(works, distinct, en: int, min_distinct: int) -> dict:
    """Per feature, its concept and languages, from ``works [C, L, F]`` and ``distinct [C, L]``
    (the language's name shares no token with English; ``en`` is English's index).

    Returns ``concept [F]`` (-1 for no concept feature), ``n_langs [F]`` languages it works in,
    ``n_distinct [F]`` non-English distinct-token languages it works in, ``english [F]``,
    ``cross [F]`` (works in English and ``n_distinct >= min_distinct``)."""
    import numpy as np

    w = np.asarray(works, bool)
    dis = np.asarray(distinct, bool).copy()
    dis[:, en] = False
    n_langs = w.sum(1)  # [C, F]
    n_dist = (w & dis[:, :, None]).sum(1)
    eng = w[:, en]
    cross = eng & (n_dist >= min_distinct)
    # a feature's concept: cross-lingual first, then most distinct-token languages, then most languages
    key = cross * 10_000 + n_dist * 100 + n_langs
    best = key.argmax(0)
    cols = np.arange(w.shape[2])
    is_concept = n_langs.max(0) > 0
    return {"concept": np.where(is_concept, best, -1), "n_langs": np.where(is_concept, n_langs[best, cols], 0),
            "n_distinct": np.where(is_concept, n_dist[best, cols], 0),
            "english": is_concept & eng[best, cols], "cross": is_concept & cross[best, cols]}


def derange(works, en: int, seed: int):
    """``works`` with each non-English language's concepts permuted without a fixed point: the
    chance level of working for "the same" concept in two languages."""
    import numpy as np

    from jsae.analysis.languages import derangement

    w = np.array(works, bool)
    C = w.shape[0]
    for li in range(w.shape[1]):
        if li != en and C >= 2:
            w[:, li] = w[derangement(C, seed + li), li]
    return w


# ---------------------------------------------------------------------------------------------
# the measure


def evaluate(run, args, *, log):
    """Multilingual concept features of ``run``'s dictionary (module doc)."""
    import dataclasses
    import time

    from jsae.bench import Result
    from jsae.bench._lexicon import CATEGORIES, LANGS, TEMPLATES, names
    from jsae.jsonsafe import finite

    langs = _choice(args.languages_langs, LANGS, "--languages-langs")
    cats = _choice(args.languages_categories, CATEGORIES, "--languages-categories")
    seed = int(args.seed)
    t0 = time.perf_counter()
    lex = names(langs, cats)
    sents = build_sentences(run.model.tokenizer, lex, langs)
    n = sum(len(s["ids"]) for s in sents.values())
    log(f"[languages] {n} sentences ({', '.join(f'{len(r)} {c}' for c, r in lex.items())} in "
        f"{len(langs)} languages) through {run.hook} ...")
    per_cat, all_metrics, details, hist, top_rows = _measure(run, sents, lex, langs, args)
    if args.languages_baseline:
        log("[languages] baseline: the same dictionary with random encoder directions ...")
        base = dataclasses.replace(run, sae=random_directions(run.sae, seed))
        b_cat, b_all, _, _, _ = _measure(base, sents, lex, langs, args)
        for m, b in ((all_metrics, b_all), *((per_cat[c], b_cat[c]) for c in sents)):
            for k in ("cross_lingual_share", "n_cross_lingual_features", "n_concept_features",
                      "concepts_with_cross_lingual_feature"):
                m[f"{k}_random_directions"] = b[k]
    claim = {c: _verdict(c, per_cat[c], args.languages_min_distinct) for c in sents}
    claim["all"] = _verdict("all categories", all_metrics, args.languages_min_distinct)
    by_transfer = sorted(details, key=lambda r: -r["transfer_from_english_distinct_tokens"])
    claim["languages_by_transfer"] = [f"{r['language']} {r['transfer_from_english_distinct_tokens']:.0%}"
                                      for r in by_transfer]
    for key, line in claim.items():
        if key != "languages_by_transfer":
            log(f"[languages] {line}")
    log("[languages] English concept features that also work (distinct tokens) in: "
        + ", ".join(claim["languages_by_transfer"]))
    config = {"languages": langs, "categories": cats, "templates_per_language": len(TEMPLATES["en"]["months"]),
              "auroc_threshold": args.languages_auroc, "max_negative_rate": args.languages_max_negative,
              "min_distinct_languages": args.languages_min_distinct, "random_seed": seed,
              "random_directions_baseline": bool(args.languages_baseline),
              "score": "max code over the name's tokens", "lexicon": "CLDR via babel",
              "llm_batch_size": max(args.batch_size, 32), "model_name": run.model_name}
    unstructured = {"claim": claim,
                    "n_distinct_languages_histogram": {str(i): int(v) for i, v in enumerate(hist) if v},
                    "top_cross_lingual_features": top_rows,
                    "lexicon": {cat: {str(c): by for c, by in rows.items()} for cat, rows in lex.items()},
                    "n_sentences": n, "seconds": round(time.perf_counter() - t0, 1)}
    return Result(config, finite({"all": all_metrics, **per_cat}), details, unstructured)


def _measure(run, sents: dict, lex: dict, langs, args) -> tuple:
    """Score every sentence with ``run``'s dictionary and derive everything reported:
    ``(per-category metrics, overall metrics, per-language rows, histogram, top features)``."""
    import jax
    import numpy as np

    from jsae.bench._texts import reduce_texts

    en, seed, F = langs.index("en"), int(args.seed), int(run.sae.spec.d_sae)
    ids = [np.asarray(x, np.int32) for s in sents.values() for x in s["ids"]]
    masks = []
    for s in sents.values():
        for x, (a, b) in zip(s["ids"], s["spans"]):
            m = np.zeros(len(x), bool)
            m[a:b] = True
            masks.append(m)
    score = reduce_texts(run, ids, masks, jax.jit(_span_max), batch_size=max(args.batch_size, 32),
                         desc="lexicon sentences")["max"]
    per_cat, kept, top_rows, offset = {}, {}, {}, 0
    for cat, s in sents.items():
        C, L = len(s["concepts"]), len(langs)
        T = len(s["ids"]) // (C * L)
        x = score[offset: offset + C * L * T].reshape(C, L, T, F)
        offset += C * L * T
        st = category_stats(x, auroc_min=args.languages_auroc, max_negative=args.languages_max_negative)
        distinct = _distinct(s, langs)
        fc = feature_concepts(st["works"], distinct, en, args.languages_min_distinct)
        cc = feature_concepts(derange(st["works"], en, seed), distinct, en, args.languages_min_distinct)
        kept[cat] = (st["works"], distinct, fc, cc)
        per_cat[cat] = {**_shares(fc, cc),
                        "n_concepts": C,
                        "concepts_with_cross_lingual_feature": float(
                            np.mean([(fc["cross"] & (fc["concept"] == k)).any() for k in range(C)])),
                        "mean_best_pooled_auroc": float(st["pooled"].max(1).mean()),
                        "distinct_token_share": float(np.delete(distinct, en, axis=1).mean())}
        top_rows[cat] = _top(fc, st, s["concepts"], lex[cat], langs, distinct)
    all_metrics, hist = _overall(kept, per_cat, F, langs, en)
    return per_cat, all_metrics, _per_language(kept, langs, en, F), hist, top_rows


def random_directions(sae, seed: int):
    """``sae`` with every encoder column replaced by a random direction of the same norm (seeded;
    biases, thresholds and the decoder kept): what the measure finds in the LM's activations
    without a learned dictionary."""
    import jax
    import jax.numpy as jnp

    w = sae.params["W_enc"]  # [..., d_sae]: latents on the last axis
    r = jax.random.normal(jax.random.PRNGKey(seed), w.shape, jnp.float32)
    axes = tuple(range(w.ndim - 1))
    r = r * jnp.linalg.norm(w.astype(jnp.float32), axis=axes, keepdims=True) / jnp.linalg.norm(r, axis=axes, keepdims=True)
    return sae.replace(params={**sae.params, "W_enc": r.astype(w.dtype)})


def _verdict(name: str, m: dict, min_distinct: int) -> str:
    """One line: the cross-lingual share against its chance level (and against random encoder
    directions where measured), and whether the claim holds: at least 5 cross-lingual features and
    a share at least twice the control's (and twice the random directions')."""
    share = m["cross_lingual_share"]
    holds = m["n_cross_lingual_features"] >= 5 and share >= 2 * m["cross_lingual_share_control"]
    base = m.get("cross_lingual_share_random_directions")
    if base is not None:
        holds = holds and share >= 2 * base
    return (f"{name}: {m['n_cross_lingual_features']} of {m['n_concept_features']} concept features "
            f"({share:.1%}) work in English and in >= {min_distinct} language(s) with other "
            f"tokens; deranged-concept control {m['cross_lingual_share_control']:.1%}"
            + ("" if base is None else f", random encoder directions {base:.1%}") + ": "
            + ("holds" if holds else "does not hold here"))


def _distinct(s: dict, langs):
    """``[C, L]``: the name of concept c in language l shares no token with the English name."""
    import numpy as np

    return np.array([[not (s["name_tokens"][c, lang] & s["name_tokens"][c, "en"]) for lang in langs]
                     for c in s["concepts"]])


def _overall(kept: dict, per_cat: dict, F: int, langs, en: int) -> tuple:
    """Metrics over every category (a feature counted once: a concept feature, or cross-lingual,
    in any category) and the histogram of distinct-token languages of the concept features."""
    import numpy as np

    con, cross, con_c, cross_c = (np.zeros(F, bool) for _ in range(4))
    en_feats = np.zeros(F, bool)
    for works, _, fc, cc in kept.values():
        con |= fc["concept"] >= 0
        cross |= fc["cross"]
        con_c |= cc["concept"] >= 0
        cross_c |= cc["cross"]
        en_feats |= works[:, en].any(0)
    nd = np.max([np.where(fc["concept"] >= 0, fc["n_distinct"], -1) for _, _, fc, _ in kept.values()], axis=0)
    hist = np.bincount(nd[nd >= 0], minlength=len(langs))
    m = {"n_concept_features": int(con.sum()), "n_cross_lingual_features": int(cross.sum()),
         "cross_lingual_share": float(cross.sum() / max(con.sum(), 1)),
         "cross_lingual_share_control": float(cross_c.sum() / max(con_c.sum(), 1)),
         "concept_feature_fraction": float(con.sum() / F),
         "n_english_concept_features": int(en_feats.sum()),
         "concepts_with_cross_lingual_feature": float(np.mean(
             [per_cat[c]["concepts_with_cross_lingual_feature"] for c in kept])),
         "n_languages": len(langs), "n_concepts": int(sum(per_cat[c]["n_concepts"] for c in kept))}
    return m, hist


def _per_language(kept: dict, langs, en: int, F: int) -> list[dict]:
    """Per non-English language: the share of the features that work for a concept in English
    that also work for it there (all, and among the concepts whose name there has distinct tokens)."""
    import numpy as np

    L = len(langs)
    en_any, also, also_dist, en_dist = (np.zeros((L, F), bool) for _ in range(4))
    shares = [[] for _ in range(L)]
    for works, distinct, _, _ in kept.values():
        e = works[:, en]  # [C, F]: works for concept c in English
        for li in range(L):
            en_any[li] |= e.any(0)
            also[li] |= (e & works[:, li]).any(0)
            also_dist[li] |= (e & works[:, li] & distinct[:, li, None]).any(0)
            en_dist[li] |= (e & distinct[:, li, None]).any(0)
            shares[li].append(float(distinct[:, li].mean()))
    return [{"language": lang,
             "transfer_from_english": float(also[li].sum() / max(en_any[li].sum(), 1)),
             "transfer_from_english_distinct_tokens": float(also_dist[li].sum() / max(en_dist[li].sum(), 1)),
             "n_english_features_with_distinct_names": int(en_dist[li].sum()),
             "distinct_token_share": float(np.mean(shares[li]))}
            for li, lang in enumerate(langs) if li != en]


def _shares(fc: dict, cc: dict) -> dict:
    import numpy as np

    n = int((fc["concept"] >= 0).sum())
    nc = int((cc["concept"] >= 0).sum())
    return {"n_concept_features": n, "n_cross_lingual_features": int(fc["cross"].sum()),
            "cross_lingual_share": float(fc["cross"].sum() / max(n, 1)),
            "cross_lingual_share_control": float(cc["cross"].sum() / max(nc, 1)),
            "mean_distinct_languages": float(np.mean(fc["n_distinct"][fc["concept"] >= 0])) if n else 0.0}


def _top(fc, st, concepts, names_by_concept, langs, distinct, n: int = 10) -> list[dict]:
    """The cross-lingual features of a category, most distinct-token languages first."""
    import numpy as np

    f = np.flatnonzero(fc["cross"])
    f = f[np.lexsort((-st["pooled"][fc["concept"][f], f], -fc["n_distinct"][f]))][:n]
    rows = []
    for j in f:
        c = int(fc["concept"][j])
        rows.append({"feature": int(j), "concept": str(concepts[c]),
                     "name_en": names_by_concept[concepts[c]]["en"],
                     "pooled_auroc": float(st["pooled"][c, j]),
                     "works_in": [lang for li, lang in enumerate(langs) if st["works"][c, li, j]],
                     "distinct_token_languages": [lang for li, lang in enumerate(langs)
                                                  if st["works"][c, li, j] and distinct[c, li] and lang != "en"]})
    return rows


__all__ = ["EVAL_TYPE_ID", "add_arguments", "build_sentences", "category_stats", "check_arguments",
           "derange", "evaluate", "feature_concepts", "grouped_auroc", "name_span", "random_directions"]

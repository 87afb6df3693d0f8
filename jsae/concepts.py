"""Concepts from examples: which features separate a set of positive texts from negatives.

Pipeline (every step a function you can call on its own):

1. :func:`read_examples` / :func:`as_examples`: texts from a file (one a line, or JSONL with a
   ``text`` field) or a list, each remembering where it came from (``file:line``).
2. :func:`example_codes`: one jitted pass per batch of examples through the LM (every hook at
   once) and its SAEs, reduced on the device to per-example statistics of every feature:
   max and mean code over the example's tokens, the number of tokens where it fires and the
   position of its max (``[N, F]`` each; BOS and padding never count).
3. :func:`auroc`, :func:`firing_rates`, :func:`sparse_probe`: rank features by how well their
   per-example max (or mean) separates the two sets; :func:`contrast` does all of it.

Metrics are plain NumPy (tested against sklearn): :func:`auroc` is the Mann-Whitney statistic
with ties counted half, :func:`binary_metrics` precision / recall / F1 from counts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import JsaeError, require
from jsae.sae.core import SAE, encode


class ExampleError(JsaeError, ValueError):
    """Example texts that cannot be used (empty file, bad JSONL line, one class only, ...)."""


# ---------------------------------------------------------------------------------------------
# example sets


@dataclasses.dataclass
class Examples:
    """Texts and where each came from (``origins[i]`` like ``pos.txt:12`` or ``list[3]``)."""

    texts: list[str]
    origins: list[str]
    name: str = "examples"

    def __len__(self) -> int:
        return len(self.texts)


def read_examples(path: str | Path) -> Examples:
    """Examples from a file: ``.jsonl`` (one JSON object a line with a ``text`` string) or any
    other text file (one example a non-blank line). Blank lines and lines starting with ``#`` in
    text files are skipped. Raises :class:`ExampleError` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"examples file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ExampleError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    texts, origins = [], []
    jsonl = p.suffix.lower() == ".jsonl"
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or (not jsonl and s.startswith("#")):
            continue
        if jsonl:
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise ExampleError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ExampleError(f"{p}:{n}: expected an object with a string field 'text'")
            s = rec["text"].strip()
            if not s:
                raise ExampleError(f"{p}:{n}: empty 'text'")
        texts.append(s)
        origins.append(f"{p}:{n}")
    if not texts:
        raise ExampleError(f"{p}: no examples (the file is empty or has only blank/comment lines)")
    return Examples(texts, origins, p.stem)


def as_examples(src, name: str = "examples") -> Examples:
    """An :class:`Examples` from a path, a list of strings, or an :class:`Examples`."""
    if isinstance(src, Examples):
        return src
    if isinstance(src, (str, Path)) and not (isinstance(src, str) and "\n" in src) and Path(src).is_file():
        return read_examples(src)
    if isinstance(src, str):
        raise FileNotFoundError(f"examples file not found: {src} (pass a list of texts for literal text)")
    texts = list(src)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ExampleError(f"{name}[{i}]: expected a non-empty string, got {t!r}")
    if not texts:
        raise ExampleError(f"{name}: no examples (empty list)")
    return Examples([t.strip() for t in texts], [f"{name}[{i}]" for i in range(len(texts))], name)


EXAMPLES_DIR = Path(__file__).parent / "data" / "examples"


def example_sets() -> list[str]:
    """Names of the example sets shipped with jsae (``jsae/data/examples/<name>/``, CC0)."""
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if (p / "train_pos.txt").is_file())


def example_set(name: str, split: str = "train") -> tuple[Examples, Examples]:
    """``(positive, negative)`` examples of a shipped set (``bridges``, ``scam_emails``,
    ``flattery``) for ``split`` ``train`` or ``test`` (disjoint templates and fillers)."""
    d = EXAMPLES_DIR / name
    if split not in ("train", "test") or not (d / f"{split}_pos.txt").is_file():
        raise ExampleError(f"no example set {name!r} split {split!r}; shipped: {', '.join(example_sets())} "
                           "with splits train, test")
    return read_examples(d / f"{split}_pos.txt"), read_examples(d / f"{split}_neg.txt")


# ---------------------------------------------------------------------------------------------
# per-example feature statistics


@dataclasses.dataclass
class ExampleCodes:
    """Per example (rows) and feature (columns) of one SAE: ``max``, ``mean`` code over the
    counted tokens, ``count`` of tokens where the code is > 0, ``argmax`` (token position of the
    max), each ``[N, F]``; ``n_tokens [N]`` counted tokens; ``ids`` the token ids fed (BOS first,
    truncated); ``active`` (only when asked): per example an int array ``[n, 2]`` of
    ``(position, feature)`` where the code is > 0."""

    max: np.ndarray
    mean: np.ndarray
    count: np.ndarray
    argmax: np.ndarray
    n_tokens: np.ndarray
    ids: list[np.ndarray]
    active: list[np.ndarray] | None = None


def tokenize_examples(tokenizer, examples: Examples, context_length: int,
                      log: Callable[[str], None] | None = None) -> list[np.ndarray]:
    """Token ids per example (BOS first), truncated to ``context_length``; says which were."""
    tok = tokenizer
    texts = examples.texts
    ids = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    out, cut = [], []
    for i, x in enumerate(ids):
        x = np.asarray(x, np.int32)
        if len(x) > context_length:
            cut.append(f"{examples.origins[i]} ({len(x)} tokens)")
            x = x[:context_length]
        if len(x) < 2 and tok.bos_id is not None and (len(x) == 0 or x[0] == tok.bos_id):
            raise ExampleError(f"{examples.origins[i]}: the example has no tokens")
        out.append(x)
    if cut:
        (log or _stderr)(f"note: {len(cut)} example(s) longer than the context ({context_length} tokens) "
                         f"were truncated: {', '.join(cut[:3])}{' ...' if len(cut) > 3 else ''}")
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@partial(jax.jit, static_argnames=("want_active",))
def _reduce_batch(sae: SAE, acts, mask, *, want_active: bool = False):
    """Per-example statistics of every feature for one batch: acts [B, T, D], mask [B, T]."""
    z = encode(sae, acts)  # [B, T, F]
    m = mask[..., None]
    z = jnp.where(m, z, 0.0)
    n = jnp.maximum(mask.sum(1), 1)[:, None].astype(z.dtype)
    fires = (z > 0) & m
    out = {"max": z.max(1), "mean": z.sum(1) / n, "count": fires.sum(1).astype(jnp.int32),
           "argmax": z.argmax(1).astype(jnp.int32)}
    if want_active:
        out["fires"] = fires
    return out


def example_codes(
    model,
    saes: Mapping[str, SAE] | SAE,
    examples,
    *,
    hook: str | None = None,
    context_length: int = 128,
    batch_size: int = 16,
    active: bool = False,
    forward: Callable | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, ExampleCodes]:
    """Statistics of every feature of every SAE on every example: ``{hook: ExampleCodes}``.

    ``saes``: ``{hook: SAE}`` (all hooks captured by one forward per batch) or one SAE with
    ``hook``. Examples are right-padded to a length bucket (multiples of 32, up to
    ``context_length``) so only a few shapes compile; the last batch is padded with masked rows.
    """
    if isinstance(saes, SAE):
        if hook is None:
            raise ValueError("example_codes: give hook= with a single SAE")
        saes = {hook: saes}
    if forward is None:
        from jsae.models.transformer import forward
    ex = as_examples(examples)
    tok = model.tokenizer
    ids = tokenize_examples(tok, ex, context_length, log)
    special = [i for i in {tok.bos_id, tok.pad_id, tok.eos_id} if i is not None]
    pad = tok.pad_id if tok.pad_id is not None else 0
    hooks = tuple(sorted(saes))
    N = len(ids)
    parts: dict[str, list[dict]] = {h: [] for h in hooks}
    act_lists: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    bar = _bar(N, "examples", progress)
    # sort by length so batches pad little; results are put back in input order
    order = np.argsort([len(x) for x in ids], kind="stable")
    for b in range(0, N, batch_size):
        rows = order[b : b + batch_size]
        T = min(context_length, max(32, -(-max(len(ids[i]) for i in rows) // 32) * 32))
        tokens = np.full((batch_size, T), pad, np.int32)
        valid = np.zeros((batch_size, T), bool)
        for j, i in enumerate(rows):
            tokens[j, : len(ids[i])] = ids[i]
            valid[j, : len(ids[i])] = True
        mask = valid & ~np.isin(tokens, special)
        out = forward(model.cfg, model.params, jnp.asarray(tokens), capture=hooks, stop_after_capture=True)
        for h in hooks:
            r = jax.device_get(_reduce_batch(saes[h], out.activations[h], jnp.asarray(mask), want_active=active))
            k = len(rows)
            parts[h].append({key: v[:k] for key, v in r.items() if key != "fires"})
            if active:
                for j in range(k):
                    act_lists[h].append(np.argwhere(r["fires"][j]).astype(np.int32))
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    inv = np.empty(N, np.int64)
    inv[order] = np.arange(N)
    n_tokens = np.array([int((~np.isin(x, special)).sum()) for x in ids])
    result = {}
    for h in hooks:
        cat = {key: np.concatenate([p[key] for p in parts[h]])[inv] for key in parts[h][0]}
        acts_h = [act_lists[h][i] for i in inv] if active else None
        result[h] = ExampleCodes(cat["max"], cat["mean"], cat["count"], cat["argmax"], n_tokens, ids, acts_h)
    return result


def _bar(total: int, unit: str, progress: bool | None):
    if progress is False or (progress is None and total < 64):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, desc=unit,
                file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# metrics (NumPy; tested against sklearn)


def average_ranks(values) -> np.ndarray:
    """Ranks 1..N down axis 0 (column-wise for ``[N, F]``), ties given their average rank
    (as ``scipy.stats.rankdata``), vectorised over columns."""
    s = np.asarray(values, np.float64)
    flat = s.reshape(s.shape[0], -1)
    n = flat.shape[0]
    order = np.argsort(flat, axis=0, kind="stable")
    srt = np.take_along_axis(flat, order, 0)
    idx = np.arange(n)[:, None]
    new = np.ones_like(srt, bool)
    new[1:] = srt[1:] != srt[:-1]
    last = np.ones_like(srt, bool)
    last[:-1] = new[1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, idx, n)[::-1], axis=0)[::-1]
    ranks = np.empty_like(flat)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, 0)
    return ranks.reshape(s.shape)


def auroc(scores, labels) -> np.ndarray | float:
    """Area under the ROC curve of ``scores [N]`` or ``[N, F]`` (column-wise) for boolean
    ``labels [N]``: the probability that a random positive scores above a random negative, ties
    counted half (Mann-Whitney U / (n_pos * n_neg)). Needs both classes."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores have {s.shape[0]} rows but labels {y.shape[0]}")
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ExampleError(f"AUROC needs positive and negative examples; got {n1} positive, {n0} negative")
    r = average_ranks(s)
    u = r[y].sum(0) - n1 * (n1 + 1) / 2.0
    a = u / (n1 * n0)
    return float(a) if np.ndim(a) == 0 else a


def binary_metrics(predicted, labels) -> dict:
    """Precision, recall, F1, accuracy and the counts of boolean predictions against labels.
    Precision is 0 when nothing is predicted positive (as sklearn's ``zero_division=0``)."""
    p = np.asarray(predicted).astype(bool).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    fn, tn = int((~p & y).sum()), int((~p & ~y).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": (tp + tn) / max(len(y), 1),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def firing_rates(values: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of positive / negative examples on which each feature fires (value > 0)."""
    y = np.asarray(labels, bool)
    f = np.asarray(values) > 0
    return f[y].mean(0), f[~y].mean(0)


@dataclasses.dataclass
class Probe:
    """A logistic probe on standardised per-example feature values:
    ``logit = sum_i coef_i * (x_i - mean_i) / scale_i + intercept``."""

    features: np.ndarray
    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    C: float
    train_accuracy: float

    def logits(self, values: np.ndarray) -> np.ndarray:
        """``values [N, len(features)]`` (same order as ``features``) -> ``[N]``."""
        return ((np.asarray(values, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def fit_probe(values: np.ndarray, labels, features, *, C: float = 1.0, penalty: str = "l2") -> Probe:
    """A logistic regression (sklearn) on the given columns of ``values [N, F]``."""
    lm = require("sklearn.linear_model", "atlas", "a logistic probe")
    feats = np.asarray(features, np.int64)
    x = np.asarray(values, np.float64)[:, feats]
    y = np.asarray(labels, bool)
    mean, scale = _standardise(x)
    xs = (x - mean) / scale
    clf = _logreg(lm, penalty, C)
    clf.fit(xs, y)
    acc = float((clf.predict(xs) == y).mean())
    return Probe(feats, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), mean, scale, C, acc)


def _logreg(lm, penalty: str, C: float):
    """sklearn's LogisticRegression with an L1 or L2 penalty (sklearn >= 1.8 spells it l1_ratio)."""
    import sklearn

    solver = "liblinear" if penalty == "l1" else "lbfgs"
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return lm.LogisticRegression(l1_ratio=1.0 if penalty == "l1" else 0.0, C=C, solver=solver,
                                     max_iter=2000)
    return lm.LogisticRegression(penalty=penalty, C=C, solver=solver, max_iter=2000)


def sparse_probe(values: np.ndarray, labels, *, n_features: int = 5, candidates: int = 256,
                 candidate_order: np.ndarray | None = None) -> Probe:
    """An L1 logistic probe using at most ``n_features`` features.

    The ``candidates`` features that best separate the sets on their own (``candidate_order``,
    default by ``|AUROC - 0.5|``) are standardised; the L1 penalty is relaxed step by step (C on
    a log grid from 1e-3 up) and the last feature set of at most ``n_features`` is kept; the
    probe is then refitted on those features alone (L2, C = 1) so the selection does not shrink
    its weights."""
    lm = require("sklearn.linear_model", "atlas", "the sparse logistic probe")
    x = np.asarray(values, np.float64)
    y = np.asarray(labels, bool)
    if candidate_order is None:
        candidate_order = np.argsort(-np.abs(np.asarray(auroc(x, y)) - 0.5), kind="stable")
    live = candidate_order[x[:, candidate_order].std(0) > 0][:candidates]
    if not len(live):
        raise ExampleError("no feature varies across the examples: nothing to probe")
    mean, scale = _standardise(x[:, live])
    xs = (x[:, live] - mean) / scale
    best = live[:1]
    for C in np.logspace(-3, 1, 25):
        clf = _logreg(lm, "l1", float(C))
        clf.fit(xs, y)
        nz = np.flatnonzero(np.abs(clf.coef_[0]) > 1e-8)
        if len(nz) > n_features:
            break
        if len(nz):
            best = live[nz[np.argsort(-np.abs(clf.coef_[0][nz]), kind="stable")]]
    return fit_probe(x, y, best, C=1.0)


# ---------------------------------------------------------------------------------------------
# contrastive search


@dataclasses.dataclass
class Contrast:
    """Every feature of one SAE scored on positive vs negative examples.

    ``auroc [F]`` of the per-example ``reduce`` value (max or mean code), ``rate_pos`` /
    ``rate_neg [F]`` fraction of examples where the feature fires at all, ``diff = rate_pos -
    rate_neg``, ``mean_pos`` / ``mean_neg [F]`` of the reduced value, ``probe`` a sparse logistic
    probe (or None), ``codes`` the per-example statistics (positives first), ``labels [N]``."""

    hook: str
    reduce: str
    auroc: np.ndarray
    rate_pos: np.ndarray
    rate_neg: np.ndarray
    diff: np.ndarray
    mean_pos: np.ndarray
    mean_neg: np.ndarray
    probe: Probe | None
    codes: ExampleCodes
    labels: np.ndarray
    examples: Examples

    def ranking(self, by: str = "auroc", k: int = 10) -> np.ndarray:
        """Top ``k`` feature ids for the positive concept, by ``auroc`` (ties broken by ``diff``)
        or ``diff`` (ties broken by AUROC)."""
        if by == "auroc":
            order = np.lexsort((-self.diff, -self.auroc))
        elif by == "diff":
            order = np.lexsort((-self.auroc, -self.diff))
        else:
            raise ValueError(f"rank by 'auroc' or 'diff'; got {by!r}")
        return order[:k]

    def values(self) -> np.ndarray:
        return self.codes.max if self.reduce == "max" else self.codes.mean

    def best_example(self, feature: int, positive: bool = True) -> int:
        """Row of the example (of that class) where ``feature`` peaks."""
        rows = np.flatnonzero(self.labels == positive)
        return int(rows[np.argmax(self.codes.max[rows, feature])])


def _check_sets(pos: Examples, neg: Examples) -> None:
    for name, ex in (("positive", pos), ("negative", neg)):
        if len(ex) == 0:
            raise ExampleError(f"the {name} set is empty")
    if len(pos) + len(neg) < 3:
        raise ExampleError("need at least 3 examples in all to compare two sets")


def contrast(
    model,
    saes: Mapping[str, SAE] | SAE,
    positive,
    negative,
    *,
    hook: str | None = None,
    reduce: str = "max",
    probe_features: int = 5,
    context_length: int = 128,
    batch_size: int = 16,
    forward: Callable | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Contrast]:
    """Score every feature at every hook on how it separates ``positive`` from ``negative``
    examples (paths, lists or :class:`Examples`): ``{hook: Contrast}``. Both sets go through
    the LM in one pass (positives first), capturing every hook at once."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean'; got {reduce!r}")
    pos, neg = as_examples(positive, "positive"), as_examples(negative, "negative")
    _check_sets(pos, neg)
    both = Examples(pos.texts + neg.texts, pos.origins + neg.origins, "examples")
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    codes = example_codes(model, saes, both, hook=hook, context_length=context_length,
                          batch_size=batch_size, forward=forward, progress=progress, log=log)
    out = {}
    for h, c in codes.items():
        v = c.max if reduce == "max" else c.mean
        a = np.asarray(auroc(v, y))
        rp, rn = firing_rates(c.max, y)
        probe = None
        if probe_features > 0 and (v.std(0) > 0).any():
            order = np.lexsort((-(rp - rn), -np.abs(a - 0.5)))
            probe = sparse_probe(v, y, n_features=probe_features, candidate_order=order)
        out[h] = Contrast(h, reduce, a, rp, rn, rp - rn, v[y].mean(0), v[~y].mean(0), probe, c, y, both)
    return out


__all__ = [
    "Contrast", "ExampleCodes", "ExampleError", "Examples", "Probe", "as_examples", "auroc",
    "average_ranks",
    "binary_metrics", "contrast", "example_set", "example_sets", "example_codes", "firing_rates", "fit_probe", "read_examples",
    "sparse_probe", "tokenize_examples",
]

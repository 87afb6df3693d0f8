"""Monitoring: where chosen features fire on incoming text.

The core is pure and jit-friendly: :func:`firing` turns activations ``[B, T, d_model]`` into
``(fires [B, T, K] bool, codes [B, T, K])`` for K features and thresholds, and
:func:`span_edges` marks where each run of firing tokens starts and ends, so it can sit inside a
jitted serving step. :func:`scan` runs a model over texts and returns the spans on the host, and
:func:`render` prints a text with them highlighted.

Measured detectors: :func:`fit_detector` fits per-feature thresholds (or a small logistic probe)
on labelled example texts, :func:`evaluate_detector` reports precision / recall / F1 / AUROC on
held-out ones, and a :class:`Detector` saves to JSON with the identity of the dictionary (a
SHA-256 of ``W_dec``) so it is refused on any other SAE (:func:`check_detector`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae.errors import FileFormatError, JsaeError
from jsae.sae.core import SAE
from jsae.steering import _as_features, _as_values, feature_codes

Array = jax.Array


def firing(sae: SAE, acts: Array, features: Array, thresholds: Array, mask: Array | None = None
           ) -> tuple[Array, Array]:
    """``(fires, codes)``: ``codes [..., K]`` of ``features [K]`` and ``fires = codes > thresholds``
    (and ``mask [...]`` where given). Pure; safe under ``jax.jit``."""
    codes = feature_codes(sae, acts, jnp.asarray(features, jnp.int32))
    fires = codes > jnp.asarray(thresholds, codes.dtype)
    if mask is not None:
        fires = fires & jnp.asarray(mask, bool)[..., None]
    return fires, codes


def span_edges(fires: Array) -> tuple[Array, Array]:
    """``(starts, ends)`` for ``fires [B, T, K]`` (time on axis 1): ``starts`` is true on the
    first token of each run of firing tokens, ``ends`` on its last token. Pure."""
    f = jnp.asarray(fires, bool)
    pad = jnp.zeros_like(f[:, :1])
    prev = jnp.concatenate([pad, f[:, :-1]], axis=1)
    nxt = jnp.concatenate([f[:, 1:], pad], axis=1)
    return f & ~prev, f & ~nxt


def runs(fires_1d: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` token spans (end exclusive) of a 1-D boolean array."""
    f = np.concatenate([[False], np.asarray(fires_1d, bool), [False]])
    d = np.diff(f.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


@dataclasses.dataclass
class Span:
    """A run of tokens ``[start, end)`` of text ``text_index`` where ``feature`` fired;
    ``peak`` is its largest code there, ``text`` the covered text, ``char_start/char_end`` its
    offsets in the decoded token text."""

    text_index: int
    feature: int
    start: int
    end: int
    peak: float
    text: str
    char_start: int
    char_end: int


@dataclasses.dataclass
class ScanResult:
    """Per text: ``ids`` (token ids, BOS first), ``pieces`` (text of each token), ``codes
    [T, K]``, and the ``spans`` where each feature fired."""

    features: np.ndarray
    thresholds: np.ndarray
    ids: list[np.ndarray]
    pieces: list[list[str]]
    codes: list[np.ndarray]
    spans: list[list[Span]]


@jax.jit
def _scan_batch(sae, acts, features, thresholds, mask):
    fires, codes = firing(sae, acts, features, thresholds, mask)
    return fires, codes


def scan(model, sae: SAE, hook: str, texts: Sequence[str] | str, features, thresholds=0.0, *,
         batch_size: int = 8, forward=None) -> ScanResult:
    """Run ``model`` over ``texts`` and return where each of ``features`` fires above its
    threshold (BOS and padding never count)."""
    from jsae.analysis.render import token_pieces
    from jsae.analysis.top import hook_activations

    if isinstance(texts, str):
        texts = [texts]
    feats = _as_features(sae, features)
    thr = _as_values(thresholds, int(feats.shape[0]), "thresholds")
    tok = model.tokenizer
    all_ids = tok.encode_batch(list(texts)) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    out = ScanResult(np.asarray(feats), np.asarray(thr), [], [], [], [])
    special = {tok.bos_id, tok.pad_id, tok.eos_id} - {None}
    for b in range(0, len(texts), batch_size):
        chunk = all_ids[b : b + batch_size]
        T = max(len(x) for x in chunk)
        ids = np.full((len(chunk), T), tok.pad_id or 0, np.int32)
        valid = np.zeros((len(chunk), T), bool)
        for i, x in enumerate(chunk):
            ids[i, : len(x)] = x  # right padding: causal attention keeps real tokens exact
            valid[i, : len(x)] = True
        mask = valid & ~np.isin(ids, list(special))
        acts = hook_activations(model, hook, ids, forward=forward)
        fires, codes = jax.device_get(_scan_batch(sae, acts, feats, thr, jnp.asarray(mask)))
        for i, x in enumerate(chunk):
            n, ti = len(x), b + i
            pieces = token_pieces(tok, x)
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
            spans = []
            for j, f in enumerate(out.features):
                for s, e in runs(fires[i, :n, j]):
                    spans.append(Span(ti, int(f), s, e, float(codes[i, s:e, j].max()),
                                      "".join(pieces[s:e]), int(offsets[s]), int(offsets[e])))
            spans.sort(key=lambda sp: (sp.start, sp.feature))
            out.ids.append(np.asarray(x))
            out.pieces.append(pieces)
            out.codes.append(np.asarray(codes[i, :n]))
            out.spans.append(spans)
    return out


def render(result: ScanResult, index: int = 0, *, style: str = "plain") -> str:
    """Text ``index`` with firing tokens marked and labelled with the features firing there:
    ``the «Golden Gate»[f123] «Bridge»[f123,f7]`` (runs of tokens with the same set of
    features form one mark)."""
    from jsae.analysis.render import highlight

    n = len(result.pieces[index])
    active: list[tuple[int, ...]] = [()] * n
    for sp in result.spans[index]:
        for t in range(sp.start, sp.end):
            active[t] = tuple(sorted({*active[t], sp.feature}))
    marks, labels, t = [], [], 0
    while t < n:
        if active[t]:
            s = t
            while t < n and active[t] == active[s]:
                t += 1
            marks.append((s, t))
            labels.append(",".join(f"f{f}" for f in active[s]))
        else:
            t += 1
    return highlight(result.pieces[index], marks, style=style, labels=labels)


# ---------------------------------------------------------------------------------------------
# detectors: thresholds or a small probe fitted on labelled examples, saved with the SAE's identity


class MonitorError(JsaeError, ValueError):
    """Bad monitor/detector input (feature ids, thresholds, detector files)."""


class DetectorMismatchError(MonitorError):
    """A detector fitted on another dictionary or hook than the one it is applied to."""


DETECTOR_FORMAT = "jsae-detector"


def decoder_sha256(sae: SAE) -> str:
    """SHA-256 of the decoder (float32 ``W_dec``, with its shape): the dictionary's identity, as a
    detector file's ``sae_sha256`` records it."""
    w = np.ascontiguousarray(np.asarray(jax.device_get(sae.params["W_dec"]), np.float32))
    h = hashlib.sha256(f"{w.shape[0]}x{w.shape[1]}:".encode())
    h.update(w.tobytes())
    return h.hexdigest()


def check_features(sae: SAE, features) -> list[int]:
    """Distinct in-range feature ids, or a one-line :class:`MonitorError`."""
    f = [int(x) for x in np.atleast_1d(np.asarray(features, np.int64))]
    bad = [x for x in f if not 0 <= x < sae.spec.d_sae]
    if not f:
        raise MonitorError("no feature ids given")
    if bad:
        raise MonitorError(f"unknown feature id(s) {bad}: the SAE has {sae.spec.d_sae} features (0-{sae.spec.d_sae - 1})")
    if len(set(f)) != len(f):
        raise MonitorError(f"feature ids must be distinct; got {f}")
    return f


@dataclasses.dataclass
class Detector:
    """A concept detector over ``features`` of the SAE at ``hook``.

    ``kind="threshold"``: a text is flagged when any feature's max code over its tokens exceeds
    that feature's threshold (``None`` = the feature never helped on the training set and is
    off); its score is ``max_i (max code_i - threshold_i) / scale_i``. ``kind="probe"``: a
    logistic regression on the standardised per-text max codes (``coef``, ``intercept``,
    ``mean``, ``scale``); flagged when the logit is > 0, the logit is its score. Tokens are
    marked where a feature exceeds its threshold (probe: where a positively weighted feature's
    code would alone, the others at their training means, make the logit positive)."""

    hook: str
    features: list[int]
    kind: str
    sae_sha256: str
    d_sae: int
    thresholds: list[float | None] | None = None
    scale: list[float] | None = None
    coef: list[float] | None = None
    intercept: float | None = None
    mean: list[float] | None = None
    run: str = ""
    context_length: int = 128
    train: dict = dataclasses.field(default_factory=dict)
    test: dict = dataclasses.field(default_factory=dict)

    def scores(self, values: np.ndarray) -> np.ndarray:
        """Per-text score from ``values [N, K]`` (per-text max code of each feature)."""
        v = np.asarray(values, np.float64)
        if self.kind == "probe":
            return ((v - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef) + self.intercept
        on = [i for i, t in enumerate(self.thresholds) if t is not None]
        if not on:
            return np.full(len(v), -np.inf)
        t = np.asarray([self.thresholds[i] for i in on])
        return ((v[:, on] - t) / np.asarray(self.scale)[on]).max(1)

    def predict(self, values: np.ndarray) -> np.ndarray:
        return self.scores(values) > 0

    def marking(self) -> tuple[list[int], list[float]]:
        """(features, thresholds) used to mark firing tokens."""
        if self.kind == "probe":  # the code at which this feature alone (others at their
            # training mean) would push the logit over 0
            pos = [(f, max(0.0, m - self.intercept * s / c))
                   for f, c, m, s in zip(self.features, self.coef, self.mean, self.scale) if c > 0]
        else:
            pos = [(f, t) for f, t in zip(self.features, self.thresholds) if t is not None]
        return [f for f, _ in pos], [t for _, t in pos]

    def to_json(self) -> dict:
        return {"format": DETECTOR_FORMAT, "version": 1, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> Path:
        from jsae.fileio import write_text

        return write_text(Path(path), json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """A detector saved by :meth:`save`, every field checked (types, lengths against the
        features it names, finite numbers, feature ids within ``d_sae``): a damaged or
        hand-edited file is refused in one line naming the file and the field."""
        from jsae import validate as v

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"detector file not found: {path}")
        d = v.read_json(path, "JSON detector file")
        if not isinstance(d, dict) or d.get("format") != DETECTOR_FORMAT:
            raise FileFormatError(f"{path}: not a jsae detector (expected \"format\": \"{DETECTOR_FORMAT}\")")
        return cls(**_checked_detector(d, path))


def _checked_detector(d: dict, path: Path) -> dict:
    """The fields of a detector file, each checked against the others (see `Detector.load`)."""
    from jsae import validate as v

    v.field(d, "version", int, path, default=1, choices=(1,))
    missing = [k for k in ("hook", "features", "kind", "sae_sha256", "d_sae") if k not in d]
    if missing:
        raise FileFormatError(f"{path}: detector lacks {missing}")
    kw: dict = {"hook": v.field(d, "hook", str, path),
                "kind": v.field(d, "kind", str, path, choices=("threshold", "probe")),
                "d_sae": v.field(d, "d_sae", int, path, lo=1)}
    if not kw["hook"].strip():
        raise v.bad(path, "field 'hook'", "is empty; expected a hook name")
    sha = v.field(d, "sae_sha256", str, path)
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise v.bad(path, "field 'sae_sha256'", f"is {sha[:70]!r}; expected 64 hex digits")
    kw["sae_sha256"] = sha
    feats = v.number_list(d, "features", path, integer=True, lo=0, hi=kw["d_sae"] - 1)
    if not feats:
        raise v.bad(path, "field 'features'", "is empty; expected at least one feature id")
    if len(set(feats)) != len(feats):
        raise v.bad(path, "field 'features'", f"repeats a feature id ({feats[:20]}); expected "
                    "distinct ids")
    kw["features"] = [int(f) for f in feats]
    K = len(feats)
    if kw["kind"] == "threshold":
        kw["thresholds"] = [None if t is None else float(t) for t in
                            v.number_list(d, "thresholds", path, n=K, none_ok=True, float32=True)]
        kw["scale"] = [float(s) for s in
                       v.number_list(d, "scale", path, n=K, lo=0, lo_open=True, float32=True)]
    else:
        kw["coef"] = [float(c) for c in v.number_list(d, "coef", path, n=K, float32=True)]
        kw["intercept"] = float(v.field(d, "intercept", float, path, float32=True))
        kw["mean"] = [float(m) for m in v.number_list(d, "mean", path, n=K, float32=True)]
        kw["scale"] = [float(s) for s in
                       v.number_list(d, "scale", path, n=K, lo=0, lo_open=True, float32=True)]
    kw["run"] = v.field(d, "run", str, path, default="")
    kw["context_length"] = v.field(d, "context_length", int, path, default=128, lo=2)
    for key in ("train", "test"):
        kw[key] = v.mapping(d.get(key) or {}, f"field {key!r}", path)
    return kw


def check_detector(det: Detector, sae: SAE, hook: str | None = None, where: str = "detector") -> None:
    """Refuse a detector fitted on another dictionary (W_dec hash) or another hook."""
    if hook is not None and det.hook != hook:
        raise DetectorMismatchError(f"{where} was fitted at hook {det.hook}, not {hook}: pass --hook {det.hook}")
    got = decoder_sha256(sae)
    if det.d_sae != sae.spec.d_sae or det.sae_sha256 != got:
        raise DetectorMismatchError(
            f"{where} was fitted on another dictionary (W_dec sha256 {det.sae_sha256[:12]}..., "
            f"{det.d_sae} features) than the SAE at {det.hook} (sha256 {got[:12]}..., "
            f"{sae.spec.d_sae} features): refit it on this run")


def _f1_over_candidates(others: np.ndarray, col: np.ndarray, cands: np.ndarray, y: np.ndarray):
    pred = others[:, None] | (col[:, None] > cands[None, :])  # [N, C]
    tp = (pred & y[:, None]).sum(0)
    fp = (pred & ~y[:, None]).sum(0)
    fn = (~pred & y[:, None]).sum(0)
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    acc = (pred == y[:, None]).mean(0)
    return f1, acc


def fit_thresholds(values: np.ndarray, labels, passes: int = 3) -> list[float | None]:
    """Per-feature thresholds for the rule "any feature's value > its threshold", chosen by
    coordinate ascent on the training F1 (ties: higher accuracy, then the higher threshold).
    Candidates are midpoints between consecutive distinct values (and half the smallest value);
    a feature whose best choice is never to fire gets ``None``."""
    v = np.asarray(values, np.float64)
    y = np.asarray(labels, bool)
    N, K = v.shape
    thr: list[float | None] = [None] * K
    fires = np.zeros((N, K), bool)
    for _ in range(passes):
        changed = False
        for k in range(K):
            u = np.unique(v[:, k])
            cands = np.r_[(u[:-1] + u[1:]) / 2, [u[0] / 2] if u[0] > 0 else [], [np.inf]]
            others = np.delete(fires, k, axis=1).any(1)
            f1, acc = _f1_over_candidates(others, v[:, k], cands, y)
            best = np.lexsort((cands, acc, f1))[-1]
            new = None if np.isinf(cands[best]) else float(cands[best])
            if new != thr[k]:
                changed = True
            thr[k] = new
            fires[:, k] = v[:, k] > (np.inf if new is None else new)
        if not changed:
            break
    return thr


def _labelled(pos, neg):
    from jsae.concepts import ExampleError, Examples, as_examples

    p, n = as_examples(pos, "positive"), as_examples(neg, "negative")
    for name, ex in (("positive", p), ("negative", n)):
        if not len(ex):
            raise ExampleError(f"the {name} set is empty")
    both = Examples(p.texts + n.texts, p.origins + n.origins)
    return both, np.r_[np.ones(len(p), bool), np.zeros(len(n), bool)]


def _feature_max(model, sae, hook, examples, features, context_length, batch_size, log):
    from jsae.concepts import example_codes

    c = example_codes(model, {hook: sae}, examples, context_length=context_length,
                      batch_size=batch_size, log=log)[hook]
    return c.max[:, features]


def detector_metrics(det: Detector, values: np.ndarray, labels) -> dict:
    """Precision, recall, F1, accuracy, counts and AUROC of a detector on labelled values."""
    from jsae.concepts import auroc, binary_metrics

    y = np.asarray(labels, bool)
    s = det.scores(values)
    m = binary_metrics(s > 0, y)
    m["auroc"] = float(auroc(np.where(np.isfinite(s), s, -1e30), y))
    m["n_pos"], m["n_neg"] = int(y.sum()), int((~y).sum())
    return m


def fit_detector(model, sae: SAE, hook: str, features, positive, negative, *, kind: str = "threshold",
                 context_length: int = 128, batch_size: int = 16, run: str = "", codes=None,
                 log=None) -> Detector:
    """Fit a detector on labelled examples (paths, lists or ``jsae.concepts.Examples``).

    ``codes``: the examples' ``jsae.concepts.ExampleCodes`` already computed (positives first,
    e.g. ``contrast(...)[hook].codes``), to skip running the model again."""
    if kind not in ("threshold", "probe"):
        raise MonitorError(f"detector kind must be 'threshold' or 'probe'; got {kind!r}")
    feats = check_features(sae, features)
    ex, y = _labelled(positive, negative)
    if codes is not None:
        if codes.max.shape != (len(y), sae.spec.d_sae):
            raise MonitorError(f"codes cover {codes.max.shape} (examples, features); expected "
                               f"({len(y)}, {sae.spec.d_sae}) for these examples and this SAE")
        v = np.asarray(codes.max)[:, feats]
    else:
        v = _feature_max(model, sae, hook, ex, feats, context_length, batch_size, log)
    scale = np.where(v.std(0) > 1e-12, v.std(0), 1.0)
    det = Detector(hook, feats, kind, decoder_sha256(sae), int(sae.spec.d_sae), run=str(run),
                   context_length=int(context_length))
    if kind == "threshold":
        det.thresholds = fit_thresholds(v, y)
        det.scale = [float(s) for s in scale]
    else:
        from jsae.concepts import fit_probe

        pr = fit_probe(v, y, np.arange(len(feats)))
        det.coef, det.intercept = [float(c) for c in pr.coef], float(pr.intercept)
        det.mean, det.scale = [float(m) for m in pr.mean], [float(s) for s in pr.scale]
    det.train = detector_metrics(det, v, y)
    return det


def evaluate_detector(det: Detector, model, sae: SAE, positive, negative, *, batch_size: int = 16,
                      log=None) -> dict:
    """Held-out precision / recall / F1 / AUROC of ``det`` (stored in ``det.test`` too)."""
    check_detector(det, sae)
    ex, y = _labelled(positive, negative)
    v = _feature_max(model, sae, det.hook, ex, det.features, det.context_length, batch_size, log)
    det.test = detector_metrics(det, v, y)
    return det.test


def apply_detector(det: Detector, model, sae: SAE, texts: Sequence[str] | str, *, batch_size: int = 8,
                   forward=None) -> tuple[np.ndarray, np.ndarray, ScanResult]:
    """``(flagged [N], scores [N], scan)`` for new texts; ``scan`` marks the firing tokens
    (render it with :func:`render`). The detector must match ``sae``."""
    check_detector(det, sae)
    if isinstance(texts, str):
        texts = [texts]
    res = scan(model, sae, det.hook, texts, det.features, 0.0, batch_size=batch_size, forward=forward)
    tok = model.tokenizer
    special = [i for i in {tok.bos_id, tok.pad_id, tok.eos_id} if i is not None]
    vals = np.stack([np.where(~np.isin(ids, special)[:, None], c, 0.0).max(0)
                     for ids, c in zip(res.ids, res.codes)])
    scores = det.scores(vals)
    mf, mt = det.marking()
    if not mf:  # every threshold off: nothing to mark
        mf, mt = det.features, [float("inf")] * len(det.features)
    marks = scan(model, sae, det.hook, texts, mf, mt, batch_size=batch_size, forward=forward)
    return scores > 0, scores, marks


__all__ = [
    "Detector", "DetectorMismatchError", "MonitorError", "ScanResult", "Span", "apply_detector",
    "check_detector", "check_features", "decoder_sha256", "detector_metrics", "evaluate_detector", "firing",
    "fit_detector", "fit_thresholds", "render", "runs", "scan", "span_edges",
]

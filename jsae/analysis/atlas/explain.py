"""Written explanations of features by a language model behind an OpenAI-compatible
chat-completions endpoint (vLLM, llama.cpp's server, a hosted API), with a detection score.

The explainer sees a feature's top examples with the activating tokens marked ``<<like this>>``
(the format of EleutherAI delphi's and OpenAI's explainers) and answers with one short phrase.
The detection scorer then shows the explanation and a shuffled mix of held-out activating
contexts (the feature's quantile-band samples, never shown to the explainer) and non-activating
ones (top examples of other features whose decoder cosine with this one is lowest; the feature
is sparse, so it almost surely does not fire there, but this is not checked), unmarked, and asks
which ones the feature fires on. The score is the balanced accuracy of those answers
(0.5 = chance, 1 = perfect).

Requests are rate limited (``min_interval`` seconds apart), retried on 429/5xx, and cached on
disk by a hash of the request, so an interrupted run resumes without asking again.

The prompts, the client and the scoring pieces (:func:`context_text`, :func:`ask_labels`,
:func:`balanced_accuracy`, the fuzzing prompt) are shared with ``jsae bench``'s autointerp
measure (jsae/bench/autointerp.py), which scores explanations on held-out corpus contexts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from jsae.analysis.atlas.types import AtlasData
from jsae.errors import JsaeError
from jsae.fileio import write_text

EXPLAIN_SYSTEM = (
    "You study the internal features of a language model. Each feature responds to some "
    "pattern in text. You will see text excerpts where one feature is active; the tokens where "
    "it is most active are marked like <<this>>. Say in a short phrase (at most 15 words) what "
    "the feature responds to: a word, a meaning, a grammatical role, a topic or a format. "
    "Answer with the phrase only."
)
DETECT_SYSTEM = (
    "You judge whether a feature of a language model is active on pieces of text, given a "
    "description of what the feature responds to. Answer with a JSON list of 0s and 1s, one per "
    "excerpt in order: 1 if the feature would be active somewhere in that excerpt, else 0."
)

FUZZ_SYSTEM = (
    "You judge whether a description of a feature of a language model explains where it is "
    "active. In each excerpt some tokens are marked like <<this>>. Answer with a JSON list of 0s "
    "and 1s, one per excerpt in order: 1 if the feature, as described, would be active on the "
    "marked tokens of that excerpt, 0 if the marks look misplaced."
)


class ExplainerError(JsaeError, RuntimeError):
    """The explainer endpoint could not be reached or answered nonsense."""


def _completions_url(url: str) -> str:
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    return u + ("/chat/completions" if u.endswith("/v1") else "/v1/chat/completions")


class ChatClient:
    """A minimal client for ``POST {url}/chat/completions`` (stdlib only), rate limited, with
    retries and an on-disk cache (``cache_dir``; None: no cache)."""

    def __init__(self, url: str, *, model: str = "default", api_key: str | None = None,
                 min_interval: float = 0.0, cache_dir: str | Path | None = None,
                 timeout: float = 60.0, retries: int = 3, max_tokens: int = 64,
                 temperature: float = 0.0):
        self.url = _completions_url(url)
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.min_interval = float(min_interval)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timeout, self.retries = timeout, retries
        self.max_tokens, self.temperature = max_tokens, temperature
        self._last = -1e9
        self.requests = 0  # HTTP requests actually sent (cache hits excluded)

    def _wait(self) -> None:
        dt = self.min_interval - (time.monotonic() - self._last)
        if dt > 0:
            time.sleep(dt)
        self._last = time.monotonic()

    def models(self) -> list[str]:
        """Model ids the endpoint lists at ``GET .../models`` (not cached)."""
        url = self.url[: -len("/chat/completions")] + "/models"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - user URL
                return [str(m["id"]) for m in json.loads(r.read().decode())["data"]]
        except urllib.error.HTTPError as e:
            raise ExplainerError(f"{url} refused to list its models: HTTP {e.code}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ExplainerError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise ExplainerError(f"{url} answered something that is not a model list ({e})") from e

    def chat(self, system: str, user: str) -> str:
        body = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": user}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        key = hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()
        cached = self.cache_dir / f"{key[:2]}" / f"{key}.json" if self.cache_dir else None
        if cached is not None and cached.exists():
            return json.loads(cached.read_text())["content"]
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        content, err = None, None
        for attempt in range(self.retries + 1):
            self._wait()
            self.requests += 1
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - user URL
                    reply = json.loads(r.read().decode())
                content = str(reply["choices"][0]["message"]["content"])
                break
            except urllib.error.HTTPError as e:
                err = f"HTTP {e.code}"
                if e.code not in (429, 500, 502, 503, 504):
                    raise ExplainerError(f"explainer at {self.url} refused the request: {err}") from e
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                err = str(getattr(e, "reason", e))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ExplainerError(f"{self.url} answered something that is not a chat "
                                     f"completion ({e})") from e
            if attempt < self.retries:
                time.sleep(min(0.5 * 2.0**attempt, 8.0))
        if content is None:
            raise ExplainerError(f"explainer at {self.url} failed after {self.retries + 1} tries: {err}")
        if cached is not None:
            write_text(cached, json.dumps({"content": content}))
        return content


def context_text(token_str: dict[int, str], tokens, acts=None, *, mark: float | None = None,
                 marked=None) -> str:
    """A context as text (ids < 0 and ``<bos>``-like tokens left out, newlines as ``\\n``);
    tokens whose code is >= ``mark``, or where the boolean array ``marked`` is set, wrapped in
    ``<< >>`` (the format of delphi's and OpenAI's explainers)."""
    out = []
    for j, t in enumerate(tokens):
        if t < 0:
            continue
        s = token_str.get(int(t), "")
        if s.startswith("<") and s.endswith(">") and len(s) > 2:  # <bos> and friends
            continue
        s = s.replace("\n", "\\n")
        on = (marked is not None and bool(marked[j])) or (
            mark is not None and acts is not None and float(acts[j]) >= mark)
        if on and s.strip():
            lead = s[: len(s) - len(s.lstrip())]
            s = f"{lead}<<{s.strip()}>>"
        out.append(s)
    return "".join(out).strip()


def _text(data: AtlasData, tokens, acts=None, *, mark: float | None = None) -> str:
    """An atlas example as text; tokens whose code is >= ``mark`` wrapped in ``<< >>``."""
    return context_text(data.token_str, tokens, acts, mark=mark)


def examples_prompt(texts: list[str]) -> str:
    """The explainer's question: marked examples, one a line, numbered from 1."""
    return "\n".join(f"Example {i + 1}: {t}" for i, t in enumerate(texts))


def explain_prompt(data: AtlasData, row: int, n_examples: int = 10) -> str:
    peak = float(data.max_act[row]) or 1.0
    texts = [_text(data, data.top_tokens[row, k], data.top_acts[row, k], mark=0.5 * peak)
             for k in range(min(n_examples, data.top_value.shape[1])) if data.top_value[row, k] > 0]
    return examples_prompt(texts)


def detection_set(data: AtlasData, row: int, n: int = 5, seed: int = 0
                  ) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)``: up to ``n`` activating band samples (label 1) and ``n`` top
    examples of the least similar features (label 0), shuffled."""
    rng = np.random.default_rng([seed, row])
    pos = []
    for b in range(data.band_value.shape[1] - 1, -1, -1):  # strongest bands first
        for s in range(data.band_value.shape[2]):
            if data.band_value[row, b, s] > 0 and len(pos) < n:
                pos.append(_text(data, data.band_tokens[row, b, s]))
    live = np.flatnonzero((data.density > 0) & (np.arange(data.n_features) != row))
    neg = []
    if len(live):
        others = rng.choice(live, size=min(len(live), 4 * n), replace=False)
        for o in others:
            if len(neg) >= n:
                break
            k = int(rng.integers(0, max(1, int((data.top_value[o] > 0).sum()))))
            if data.top_value[o, k] > 0:
                neg.append(_text(data, data.top_tokens[o, k]))
    texts = pos + neg
    labels = np.array([1] * len(pos) + [0] * len(neg))
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], labels[order]


def _parse_answers(reply: str, n: int) -> np.ndarray | None:
    m = re.search(r"\[[\s\d,]*\]", reply)
    if not m:
        return None
    try:
        vals = [int(v) for v in json.loads(m.group(0))]
    except ValueError:
        return None
    return np.array(vals[:n]) if len(vals) >= n else None


def balanced_accuracy(labels, preds) -> float:
    """``(TPR + TNR) / 2`` of 0/1 predictions (NaN unless both classes occur)."""
    y, p = np.asarray(labels).astype(bool), np.asarray(preds).astype(bool)
    if not y.any() or y.all():
        return float("nan")
    return 0.5 * (float(np.mean(p[y])) + float(np.mean(~p[~y])))


def labels_prompt(explanation: str, texts: list[str]) -> str:
    """The scorer's question: the explanation, then the excerpts numbered from 1."""
    return (f"Feature description: {explanation}\n\n"
            + "\n".join(f"Excerpt {i + 1}: {t}" for i, t in enumerate(texts))
            + f"\n\nAnswer with a JSON list of {len(texts)} numbers (0 or 1).")


def ask_labels(client: ChatClient, system: str, explanation: str, texts: list[str]
               ) -> np.ndarray | None:
    """The scorer's 0/1 answer per excerpt (``system``: :data:`DETECT_SYSTEM` or
    :data:`FUZZ_SYSTEM`); None when the reply holds no usable list."""
    return _parse_answers(client.chat(system, labels_prompt(explanation, texts)), len(texts))


def detection_score(client: ChatClient, explanation: str, texts: list[str], labels: np.ndarray
                    ) -> float:
    """Balanced accuracy of the scorer's answers (NaN if it answered no usable list)."""
    if not len(texts) or labels.min() == labels.max():
        return float("nan")
    pred = ask_labels(client, DETECT_SYSTEM, explanation, texts)
    return float("nan") if pred is None else balanced_accuracy(labels, pred)


def clean_explanation(reply: str) -> str:
    """The explainer's first non-empty line, unquoted, at most 200 characters."""
    lines = [x.strip() for x in reply.strip().splitlines() if x.strip()]
    return (lines[0] if lines else "").strip('"')[:200]


def explain_atlas(data: AtlasData, client: ChatClient, *, features=None, n_features: int = 50,
                  n_examples: int = 10, n_detect: int = 5, seed: int = 0, progress: bool = True
                  ) -> AtlasData:
    """Fill ``data.explanations`` / ``data.explanation_scores`` for ``features`` (default: the
    ``n_features`` most frequent live ones). Rerunning with the same client cache costs no
    requests for what was done already."""
    if features is None:
        live = np.flatnonzero(data.density > 0)
        features = data.feature_ids[live[np.argsort(-data.density[live], kind="stable")][:n_features]]
    if data.explanations is None:
        data.explanations = [None] * data.n_features
    if data.explanation_scores is None:
        data.explanation_scores = np.full(data.n_features, np.nan, np.float32)
    it = list(features)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="explain", unit="feature")
    for f in it:
        r = data.row(int(f))
        prompt = explain_prompt(data, r, n_examples)
        if not prompt:
            continue
        expl = clean_explanation(client.chat(EXPLAIN_SYSTEM, prompt))
        texts, labels = detection_set(data, r, n_detect, seed)
        data.explanations[r] = expl
        data.explanation_scores[r] = detection_score(client, expl, texts, labels)
    scored = np.isfinite(data.explanation_scores)
    data.meta["explainer"] = f"{client.model} at {client.url}"
    data.meta["explanation_score"] = ("detection balanced accuracy on held-out band samples vs "
                                      f"other features' top examples; mean "
                                      f"{float(np.nanmean(data.explanation_scores)) if scored.any() else float('nan'):.3f}"
                                      f" over {int(scored.sum())} features")
    return data

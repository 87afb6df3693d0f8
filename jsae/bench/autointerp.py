"""Automated interpretability: explanations of sampled live features scored on held-out contexts (detection, fuzzing; offline: each feature's top-token label)

The contexts are the offline-corpus sample that :func:`jsae.analysis.run.corpus_stats` scans
(same sampler and seed). One LM pass encodes them, token by token, for a random set of
candidate features (``CANDIDATES`` per feature wanted, so that no separate scan of the whole
dictionary is needed to find live ones); the features are the first candidates, in random
order, that are active in at least 3 contexts (SAEBench samples alive latents at random the
same way). A token is *active* when its code exceeds
``act_threshold`` times the feature's peak over the corpus (SAEBench's ``act_threshold_frac``);
a context is active when one of its tokens is. Per feature:

- the explainer sees ``explain_examples`` of the strongest active contexts (a random subset of
  the top ones, as SAEBench splits its top examples) with active tokens marked ``<<like this>>``
  and answers with a short phrase;
- held out: ``score_examples`` active contexts (the rest of the top ones, then random active
  ones) and as many contexts with no active token;
- **detection**: the scorer sees the explanation and the held-out contexts, unmarked and
  shuffled, and says which ones the feature fires on;
- **fuzzing** (EleutherAI delphi's scorer): the scorer sees the held-out active contexts with
  tokens marked, about half of them on the truly active tokens and the rest on as many random
  inactive ones, and says which marks are right: the explanation must say *which* tokens fire.

Each score is a balanced accuracy ((TPR + TNR) / 2, 0.5 = chance) pooled over the items of all
features, with a 95% bootstrap interval that resamples features (a feature's items are not
independent). ``autointerp_score`` is SAEBench's name: the mean over features of each one's
detection score (SAEBench's scoring set mixes top, importance-weighted and random contexts and
averages plain accuracy; this one is balanced by construction). A feature active in nearly every
context has no inactive one to hold out: its items count in the pooled score, but it has no
detection score of its own (None in the details).

Without an explainer the **offline** score needs no language model: a feature's label is the
set of tokens at the peak of its explainer contexts (what the atlas's token labels list), and it
predicts "active" wherever one of those tokens occurs in the held-out contexts: balanced
accuracy per context (detection) and per token. It is always reported.

Replies are cached on disk by a hash of each request (feature and prompt), so an interrupted or
repeated run asks the endpoint nothing it asked before.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

EVAL_TYPE_ID = "autointerp"
N_BOOT = 1000
CANDIDATES = 4  # features encoded per feature wanted: dead and rare ones are passed over


def add_arguments(group) -> None:
    from jsae.commands._args import positive_int, probability

    group.add_argument("--autointerp-explainer", metavar="URL",
                       help="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1 of `jsae "
                            "serve`, vLLM, a hosted API) that writes and scores explanations; "
                            "without it only the offline label score is computed")
    group.add_argument("--autointerp-model", metavar="NAME",
                       help="model name sent to the endpoint (default: the first it lists)")
    group.add_argument("--autointerp-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the endpoint's API key "
                            "(default OPENAI_API_KEY; unset: no key sent)")
    group.add_argument("--autointerp-features", type=positive_int, metavar="N", default=100,
                       help="live features sampled (default 100)")
    group.add_argument("--autointerp-contexts", type=positive_int, metavar="N", default=512,
                       help="corpus contexts scanned (default 512)")
    group.add_argument("--autointerp-context-length", type=positive_int, metavar="N", default=64,
                       help="tokens per context (default 64)")
    group.add_argument("--autointerp-explain-examples", type=positive_int, metavar="N", default=10,
                       help="top contexts shown to the explainer (default 10)")
    group.add_argument("--autointerp-score-examples", type=positive_int, metavar="N", default=6,
                       help="held-out active contexts per feature and scorer, and as many "
                            "inactive ones for detection (default 6; at least 2)")
    group.add_argument("--autointerp-act-threshold", type=probability, metavar="FRAC", default=0.01,
                       help="a token is active above this fraction of the feature's peak "
                            "(default 0.01, SAEBench's)")
    group.add_argument("--autointerp-cache", metavar="DIR",
                       help="folder of cached replies (default RUN_DIR/analysis/<hook>/autointerp)")
    group.add_argument("--autointerp-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="how long to wait for one reply before retrying (default 300: a "
                            "CPU-served model is slow)")
    group.add_argument("--autointerp-min-interval", type=float, default=0.0, metavar="SECONDS",
                       help="least time between two requests (rate limit; default 0)")


def check_arguments(args) -> None:
    from jsae.config import ConfigError

    url = args.autointerp_explainer
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"--autointerp-explainer must be an http:// or https:// URL; got {url!r}")
    if args.autointerp_score_examples < 2:
        raise ConfigError("--autointerp-score-examples must be >= 2 (a scorer needs both classes); "
                          f"got {args.autointerp_score_examples}")
    if not math.isfinite(args.autointerp_timeout) or args.autointerp_timeout <= 0:
        raise ConfigError(f"--autointerp-timeout must be > 0 seconds; got {args.autointerp_timeout}")
    if not math.isfinite(args.autointerp_min_interval) or args.autointerp_min_interval < 0:
        raise ConfigError(f"--autointerp-min-interval must be >= 0; got {args.autointerp_min_interval}")


# ---------------------------------------------------------------------------------------------
# scoring math


def pooled_balanced_accuracy(items: list[tuple[np.ndarray, np.ndarray]], *, n_boot: int = N_BOOT,
                             seed: int = 0, level: float = 0.95) -> dict:
    """Balanced accuracy of ``items`` (one ``(labels, preds)`` pair of 0/1 arrays per feature)
    pooled over all of them, and its bootstrap interval over features: ``n_boot`` draws
    ``rng.integers(0, F, (n_boot, F))`` (``rng = default_rng(seed)``) of features with
    replacement, each draw's pooled balanced accuracy, the ``level`` percentile interval.
    Returns ``{balanced_accuracy, ci_low, ci_high, n_features, n_items}`` (NaN when empty)."""
    from jsae.analysis.atlas.explain import balanced_accuracy

    items = [(np.asarray(y).astype(bool), np.asarray(p).astype(bool)) for y, p in items if len(y)]
    F = len(items)
    out = {"balanced_accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
           "n_features": F, "n_items": int(sum(len(y) for y, _ in items))}
    if not F:
        return out
    out["balanced_accuracy"] = balanced_accuracy(np.concatenate([y for y, _ in items]),
                                                 np.concatenate([p for _, p in items]))
    tp = np.array([(y & p).sum() for y, p in items], float)
    pos = np.array([y.sum() for y, _ in items], float)
    tn = np.array([(~y & ~p).sum() for y, p in items], float)
    neg = np.array([(~y).sum() for y, _ in items], float)
    draws = np.random.default_rng(seed).integers(0, F, (n_boot, F))
    with np.errstate(invalid="ignore", divide="ignore"):
        ba = 0.5 * (tp[draws].sum(1) / pos[draws].sum(1) + tn[draws].sum(1) / neg[draws].sum(1))
    ba = ba[np.isfinite(ba)]
    if len(ba):
        a = 100 * (1 - level) / 2
        out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(ba, [a, 100 - a]))
    return out


def fuzz_marks(active: np.ndarray, visible: np.ndarray, rng) -> np.ndarray:
    """Wrong marks for a context: as many tokens as it has active (visible) ones, drawn among its
    visible inactive tokens (all of them when there are fewer). ``[T]`` bool."""
    k = int((active & visible).sum())
    pool = np.flatnonzero(visible & ~active)
    out = np.zeros_like(active, bool)
    out[rng.choice(pool, size=min(k, len(pool)), replace=False)] = True
    return out


# ---------------------------------------------------------------------------------------------
# per-feature data


def feature_token_codes(run, contexts: np.ndarray, features: np.ndarray, batch_size: int,
                        progress=None) -> np.ndarray:
    """Codes ``[N, T, S]`` of ``features`` (S ids) at every token of ``contexts [N, T]``; 0 at
    BOS and padding. One LM pass stopped at the hook per batch, one compiled shape."""
    import jax
    import jax.numpy as jnp

    from jsae.analysis.top import default_mask, hook_activations
    from jsae.steering import feature_codes

    mask = default_mask(run.model, contexts)
    feats = jnp.asarray(features, jnp.int32)
    codes = jax.jit(feature_codes)
    N = len(contexts)
    out = np.zeros((N, contexts.shape[1], len(features)), np.float32)
    for start in range(0, N, batch_size):
        tok = contexts[start:start + batch_size]
        n = len(tok)
        if n < batch_size:
            tok = np.concatenate([tok, np.repeat(tok[-1:], batch_size - n, 0)])
        z = codes(run.sae, hook_activations(run.model, run.hook, tok), feats)
        out[start:start + n] = np.asarray(jax.device_get(z))[:n]
        if progress:
            progress(n)
    out[~mask] = 0.0
    return out


def split_contexts(z: np.ndarray, thr: float, n_explain: int, n_score: int, rng) -> dict | None:
    """One feature's contexts (codes ``z [N, T]``): ``explain`` (strongest active first),
    held-out ``pos`` (active) and ``neg`` (no active token) row ids; None with under 3 active."""
    ctx_max = z.max(1)
    act = np.flatnonzero(ctx_max > thr)
    if len(act) < 3:
        return None
    act = act[np.argsort(-ctx_max[act], kind="stable")]
    n_hold = min(n_score, len(act) // 2)
    n_exp = min(n_explain, len(act) - n_hold)
    pool = act[: n_exp + n_hold // 2]
    pick = rng.permutation(len(pool))
    explain = pool[np.sort(pick[:n_exp])]  # strongest first, as pool is
    held = list(pool[pick[n_exp:]])
    rest = act[len(pool):]
    held += list(rng.choice(rest, size=min(n_hold - len(held), len(rest)), replace=False))
    inactive = np.flatnonzero(ctx_max <= thr)
    neg = rng.choice(inactive, size=min(n_hold, len(inactive)), replace=False)
    return {"explain": explain, "pos": np.array(held, int), "neg": np.asarray(neg, int)}


# ---------------------------------------------------------------------------------------------
# the measure


def _client(args, cache_dir: Path, log):
    from jsae.analysis.atlas.explain import ChatClient, ExplainerError

    key = os.environ.get(args.autointerp_api_key_env) or None
    c = ChatClient(args.autointerp_explainer, model=args.autointerp_model or "default", api_key=key,
                   min_interval=args.autointerp_min_interval, cache_dir=cache_dir,
                   timeout=args.autointerp_timeout, max_tokens=96, temperature=0.0)
    if not args.autointerp_model:
        names = c.models()
        if not names:
            raise ExplainerError(f"{args.autointerp_explainer} lists no model; pass --autointerp-model")
        c.model = names[0]
    log(f"[autointerp] explainer {c.model} at {c.url}; replies cached in {cache_dir}")
    return c


def evaluate(run, args, *, log):
    from tqdm.auto import tqdm

    from jsae.analysis.atlas import explain as ex
    from jsae.analysis.atlas.labels import token_strings
    from jsae.analysis.corpus import corpus_contexts
    from jsae.bench import Result

    seed = int(args.seed)
    thr_frac = float(args.autointerp_act_threshold)
    n_explain, n_score = args.autointerp_explain_examples, args.autointerp_score_examples
    n_feat = int(args.autointerp_features)
    client = None  # first: an unreachable endpoint is said before the LM pass
    if args.autointerp_explainer:
        cache = Path(args.autointerp_cache) if args.autointerp_cache else (
            run.path / "analysis" / run.hook / "autointerp")
        client = _client(args, cache, log)
    # the contexts `corpus_stats` scans (same sampler and seed), encoded once for candidates only
    contexts, _ = corpus_contexts(run.model.tokenizer, args.autointerp_contexts,
                                  args.autointerp_context_length, seed=seed)
    contexts = np.asarray(contexts)
    d_sae = int(run.sae.spec.d_sae)
    order = np.random.default_rng([seed, 7]).permutation(d_sae)
    cand = np.sort(order[: min(d_sae, CANDIDATES * n_feat)])
    log(f"[autointerp] encoding {len(contexts)} contexts x {contexts.shape[1]} tokens for "
        f"{len(cand)} random candidate features ...")
    with tqdm(total=len(contexts), desc="autointerp codes", unit="ctx", leave=False) as bar:
        codes = feature_token_codes(run, contexts, cand, args.batch_size, progress=bar.update)
    fired = (codes.max(1) > 0).sum(0)  # contexts where each candidate fires
    rank = np.argsort(order)[cand]  # place in the random order
    eligible = np.flatnonzero(fired >= 3)
    keep = np.sort(eligible[np.argsort(rank[eligible], kind="stable")][:n_feat])
    codes, feats = codes[:, :, keep], cand[keep]
    n_live = int((fired > 0).sum())
    log(f"[autointerp] {len(feats)} features: the first of {len(cand)} random candidates active in "
        f">= 3 contexts ({n_live} fire at all, {len(eligible)} in >= 3)")
    token_str = token_strings(run.model.tokenizer, contexts)
    visible = np.vectorize(lambda t: bool(token_str.get(int(t), "").strip())
                           and not _special(token_str.get(int(t), "")), otypes=[bool])(contexts)

    rows, det_items, fuzz_items, lab_ctx, lab_tok = [], [], [], [], []
    skipped, unparsed = 0, {"detection": 0, "fuzzing": 0}
    for s, f in enumerate(tqdm(feats, desc="autointerp", unit="feature", disable=client is None)):
        z = codes[:, :, s]
        thr = thr_frac * float(z.max())
        frng = np.random.default_rng([seed, int(f)])
        sp = split_contexts(z, thr, n_explain, n_score, frng)
        if sp is None:
            skipped += 1
            continue
        active = z > thr
        held = np.concatenate([sp["pos"], sp["neg"]])
        y_ctx = np.r_[np.ones(len(sp["pos"]), bool), np.zeros(len(sp["neg"]), bool)]
        # offline: the tokens at the explainer contexts' peaks predict activity
        label = np.unique(contexts[sp["explain"], z[sp["explain"]].argmax(1)])
        hit = np.isin(contexts[held], label) & visible[held]
        lab_ctx.append((y_ctx, hit.any(1)))
        tok_mask = visible[held]
        lab_tok.append((active[held][tok_mask], hit[tok_mask]))
        row = {"latent": int(f), "label_tokens": [token_str.get(int(t), "") for t in label],
               "label_detection": ex.balanced_accuracy(*lab_ctx[-1]),
               "label_token": ex.balanced_accuracy(*lab_tok[-1]),
               "n_active_contexts": int((z.max(1) > thr).sum())}
        if client is not None:
            texts = [ex.context_text(token_str, contexts[c], marked=active[c] & visible[c])
                     for c in sp["explain"]]
            expl = ex.clean_explanation(client.chat(ex.EXPLAIN_SYSTEM, ex.examples_prompt(texts)))
            row["explanation"] = expl
            # detection: held-out active and inactive contexts, unmarked, shuffled
            mix = frng.permutation(len(held))
            pred = ex.ask_labels(client, ex.DETECT_SYSTEM, expl,
                                 [ex.context_text(token_str, contexts[held[i]]) for i in mix])
            row["detection_score"] = float("nan")
            if pred is None:
                unparsed["detection"] += 1
            else:
                det_items.append((y_ctx[mix], pred))
                row["detection_score"] = ex.balanced_accuracy(y_ctx[mix], pred)
            # fuzzing: held-out active contexts, about half marked right, the rest wrong
            pos = sp["pos"][frng.permutation(len(sp["pos"]))]
            right = np.arange(len(pos)) >= len(pos) // 2
            marks = [active[c] & visible[c] if ok else fuzz_marks(active[c], visible[c], frng)
                     for c, ok in zip(pos, right)]
            mix = frng.permutation(len(pos))
            pred = ex.ask_labels(client, ex.FUZZ_SYSTEM, expl,
                                 [ex.context_text(token_str, contexts[pos[i]], marked=marks[i])
                                  for i in mix])
            row["fuzzing_score"] = float("nan")
            if pred is None:
                unparsed["fuzzing"] += 1
            else:
                fuzz_items.append((right[mix], pred))
                row["fuzzing_score"] = ex.balanced_accuracy(right[mix], pred)
        rows.append(row)

    off_det = pooled_balanced_accuracy(lab_ctx, seed=seed)
    off_tok = pooled_balanced_accuracy(lab_tok, seed=seed)
    metrics = {"offline": {
        "label_detection_balanced_accuracy": off_det["balanced_accuracy"],
        "label_detection_ci_low": off_det["ci_low"], "label_detection_ci_high": off_det["ci_high"],
        "label_token_balanced_accuracy": off_tok["balanced_accuracy"],
        "label_token_ci_low": off_tok["ci_low"], "label_token_ci_high": off_tok["ci_high"],
        "n_features": off_det["n_features"]}}
    unstructured = {"candidates": len(cand), "candidates_firing": n_live,
                    "candidates_in_3_contexts": len(eligible), "skipped_too_rare": skipped,
                    "corpus_tokens": int(contexts.size)}
    if client is not None:
        per = np.array([r["detection_score"] for r in rows], float)
        per = per[np.isfinite(per)]
        metrics["autointerp"] = {
            "autointerp_score": float(per.mean()) if len(per) else float("nan"),
            "autointerp_std_dev": float(per.std(ddof=1)) if len(per) > 1 else float("nan")}
        for name, items in (("detection", det_items), ("fuzzing", fuzz_items)):
            metrics[name] = pooled_balanced_accuracy(items, seed=seed)
        unstructured.update({"explainer": f"{client.model} at {client.url}",
                             "requests_sent": client.requests, "unparsed_replies": unparsed,
                             "cache": str(client.cache_dir)})
    config = {"model_name": run.model_name, "n_latents": int(args.autointerp_features),
              "dataset_name": "jsae offline corpus", "n_contexts": int(args.autointerp_contexts),
              "llm_context_size": int(args.autointerp_context_length),
              "n_top_ex_for_generation": int(n_explain), "n_ex_for_scoring": int(n_score),
              "act_threshold_frac": thr_frac, "random_seed": seed, "n_bootstrap": N_BOOT,
              "explainer_url": args.autointerp_explainer,
              "explainer_model": client.model if client is not None else None}
    return Result(config=config, metrics=metrics, details=rows, unstructured=unstructured)


def _special(s: str) -> bool:
    return s.startswith("<") and s.endswith(">") and len(s) > 2

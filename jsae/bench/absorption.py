"""Feature absorption on the first-letter task (SAEBench's absorption_first_letter, Chanin et al. 2024).

Single-token words of the model's vocabulary are asked for their first letter in SAEBench's
in-context prompt. A linear probe per letter is trained on the LM's activations at the hook
(80% of the words) and k-sparse probes on the dictionary's codes pick each letter's feature(s):
k grows while the F1 rises by more than ``--absorption-f1-jump`` (feature splitting). On the
held-out words the probe gets right, absorption is where the letter's features stay quiet and
other features aligned with the probe carry its direction (``jsae.bench._absorption_calc``).
Only letters whose probe F1 exceeds ``--absorption-min-probe-f1`` count, as in SAEBench.

Where jsae differs from sae-bench 0.6.0 (checked against it in tests/test_bench_absorption.py):
a sample of the vocabulary's words (SAEBench takes all of them: ~140k on Gemma 3, hours on a
CPU), with the L1 selection probe's minibatch shrunk to keep ~20 steps an epoch (:func:`l1_batch`);
the word's token is found from each prompt's own end (SAEBench indexes a right-padded batch at
-6: the same where all prompts have one length, as on Gemma 3); the sparse probes' logistic
regression is solved exactly (Newton) where SAEBench runs scikit-learn's lbfgs; with too few
good letters the scores are null where SAEBench writes no file.
"""

from __future__ import annotations

import functools

EVAL_TYPE_ID = "absorption_first_letter"


def add_arguments(group) -> None:
    group.add_argument("--absorption-words", type=int, default=2000, metavar="N",
                       help="single-token words sampled from the vocabulary (80%% train the probes, "
                       "20%% are measured; 0: all, as SAEBench; default 2000)")
    group.add_argument("--absorption-max-k", type=int, default=10, metavar="K",
                       help="largest k of the k-sparse probes (default 10, SAEBench's)")
    group.add_argument("--absorption-f1-jump", type=float, default=0.03, metavar="X",
                       help="F1 rise that counts as a split feature (default 0.03)")
    group.add_argument("--absorption-min-probe-f1", type=float, default=0.6, metavar="X",
                       help="letters whose probe F1 is at most this are left out (default 0.6)")
    group.add_argument("--absorption-min-letters", type=int, default=20, metavar="N",
                       help="fewer letters with a good probe than this: no absorption score (default 20)")
    group.add_argument("--absorption-epochs", type=int, default=50, metavar="N",
                       help="epochs of the probe and of the L1 feature-selection probe (default 50)")


def check_arguments(args) -> None:
    from jsae.config import ConfigError

    if args.absorption_words != 0 and args.absorption_words < 52:
        raise ConfigError(f"--absorption-words must be 0 (all) or >= 52; got {args.absorption_words}")
    if not 1 <= args.absorption_max_k <= 100:
        raise ConfigError(f"--absorption-max-k must be in 1..100; got {args.absorption_max_k}")
    if args.absorption_epochs < 1:
        raise ConfigError(f"--absorption-epochs must be >= 1; got {args.absorption_epochs}")
    if not 0 <= args.absorption_min_probe_f1 < 1:
        raise ConfigError(f"--absorption-min-probe-f1 must be in [0, 1); got {args.absorption_min_probe_f1}")
    if not 1 <= args.absorption_min_letters <= 26:
        raise ConfigError(f"--absorption-min-letters must be in 1..26; got {args.absorption_min_letters}")
    if args.absorption_f1_jump < 0:
        raise ConfigError(f"--absorption-f1-jump must be >= 0; got {args.absorption_f1_jump}")


def _codes(sae, acts, chunk: int = 256):
    """``[N, d_sae]`` codes of ``acts [N, D]``, encoded in fixed-size chunks (one compile)."""
    import jax.numpy as jnp
    import numpy as np

    enc = _jit_encode()
    out = np.zeros((len(acts), sae.spec.d_sae), np.float32)
    for s in range(0, len(acts), chunk):
        part = acts[s:s + chunk]
        padded = np.zeros((chunk, acts.shape[1]), np.float32)
        padded[:len(part)] = part
        out[s:s + len(part)] = np.asarray(enc(sae, jnp.asarray(padded)))[:len(part)]
    return out


@functools.cache
def _jit_encode():
    """One jitted encoder for every call (its cache survives between them)."""
    import jax

    from jsae.sae.core import encode

    return jax.jit(encode)


def l1_batch(n_train: int) -> int:
    """Minibatch of the L1 feature-selection probe: SAEBench's 4096, made smaller on a sample of
    the vocabulary so that an epoch still has ~20 steps (SAEBench trains on every single-token
    word: tens of thousands on Gemma's vocabulary; 4096 on 1600 words would be 50 Adam steps in
    all, too few to rank the features)."""
    return int(min(4096, max(64, n_train // 20)))


def measure(model, sae, hook: str, *, n_words: int = 2000, seed: int = 0, max_k: int = 10,
            f1_jump: float = 0.03, min_probe_f1: float = 0.6, min_letters: int = 20,
            epochs: int = 50, batch_size: int = 16, l1_batch_size: int | None = None, words=None,
            log=print) -> dict:
    """The absorption measure of ``sae`` at ``hook`` of ``model``: ``{"rows": per letter,
    "metrics": ..., "words": {...}}``. ``words``: use these words instead of the vocabulary's."""
    import numpy as np
    from tqdm.auto import tqdm

    from jsae.analysis.logits import feature_directions
    from jsae.bench import _absorption_calc as calc
    from jsae.bench import _absorption_data as data
    from jsae.bench._absorption_probes import f1, fit_logistic, train_probes

    rng = np.random.default_rng(seed)
    vocab = list(words) if words is not None else data.alpha_words(model.tokenizer)
    n_vocab = len(vocab)
    if n_words and len(vocab) > n_words:
        vocab = [vocab[i] for i in np.sort(rng.choice(len(vocab), n_words, replace=False))]
    if len(vocab) < 52:
        from jsae.config import ConfigError

        raise ConfigError(f"absorption: the tokenizer has only {len(vocab)} single-token words; "
                          "the first-letter task needs at least 52")
    order = rng.permutation(len(vocab))
    cut = int(len(vocab) * 0.8)
    train_w = [vocab[i] for i in order[:cut]]
    test_w = [vocab[i] for i in order[cut:]]
    y_train = np.array([data.letter_index(w) for w in train_w])
    y_test = np.array([data.letter_index(w) for w in test_w])
    prompts = ([data.icl_prompt(w, train_w, rng) for w in train_w]
               + [data.icl_prompt(w, test_w, rng) for w in test_w])
    log(f"absorption: {len(vocab)} of the vocabulary's {n_vocab} single-token words "
        f"({len(train_w)} train the probes, {len(test_w)} measured)")
    bar = tqdm(total=len(prompts), desc="absorption: prompts", unit="prompt")
    acts, read = data.hook_activations(model, hook, prompts, batch_size=batch_size, progress=bar.update)
    # SAEBench reads the 6th token from the end as the word's: how often that holds here
    own = np.array([data.own_token(model.tokenizer, w) for w in train_w + test_w])
    at_word = float(np.mean(read == own))
    x_train, x_test = acts[:cut], acts[cut:]
    W, b = train_probes(x_train, y_train, 26, seed=seed, epochs=epochs, batch_size=64, lr=1e-2,
                        weight_decay=1e-4)
    probe_test = x_test @ W.T + b  # [N_test, 26]
    z_train, z_test = _codes(sae, x_train), _codes(sae, x_test)
    # the L1 probe on the codes ranks each letter's features (largest weight first)
    W1, _ = train_probes(z_train, y_train, 26, seed=seed + 1, epochs=epochs,
                         batch_size=l1_batch_size or l1_batch(len(z_train)), lr=1e-2,
                         weight_decay=1e-6, l1=0.01)
    ranked = np.argsort(-W1, axis=1, kind="stable")[:, :max_k]
    dirs = np.asarray(feature_directions(sae, np.arange(sae.spec.d_sae)), np.float64)
    rows, absorb_prompts, absorb_sets = [], [], []
    for li, letter in enumerate(data.LETTERS):
        yt, ye = y_train == li, y_test == li
        f1s, feats = [], []
        for k in range(1, max_k + 1):
            ids = ranked[li, :k]
            w, c = fit_logistic(z_train[:, ids], yt)
            f1s.append(f1(z_test[:, ids] @ w + c > 0, ye))
            feats.append(ids.tolist())
        split = calc.split_features(f1s, feats, f1_jump)
        tp = np.flatnonzero(ye & (probe_test[:, li] > 0))
        rows.append({"first_letter": letter, "f1_probe": f1(probe_test[:, li] > 0, ye),
                     "f1_sparse_k1": f1s[0], "f1_split_features": f1s[len(split) - 1],
                     "split_features": split, "num_split_features": len(split),
                     "num_probe_true_positives": int(len(tp)), "num_test_words": int(ye.sum())})
        # the measured words get fresh prompts with examples from the whole word list
        absorb_prompts += [data.icl_prompt(test_w[i], vocab, rng) for i in tp]
        absorb_sets.append([test_w[i] for i in tp])
    bar.total += len(absorb_prompts)
    bar.refresh()
    a_acts, _ = data.hook_activations(model, hook, absorb_prompts, batch_size=batch_size,
                                      progress=bar.update)
    bar.close()
    a_codes = _codes(sae, a_acts) if len(a_acts) else np.zeros((0, sae.spec.d_sae), np.float32)
    s = 0
    for li, row in enumerate(rows):
        n = row["num_probe_true_positives"]
        cos = calc.cosines(W[li], dirs)
        frac, full = calc.absorption(a_acts[s:s + n], a_codes[s:s + n], W[li], cos, row["split_features"])
        s += n
        row["mean_absorption_fraction"] = float(frac.sum() / n) if n else float("nan")
        row["num_full_absorption"] = int(full.sum())
        row["full_absorption_rate"] = float(full.sum() / n) if n else float("nan")
        row["measured_words"] = absorb_sets[li]
        row["absorbed_words"] = [w for w, f in zip(absorb_sets[li], full) if f]
    good = [r for r in rows if r["f1_probe"] > min_probe_f1 and r["num_probe_true_positives"] > 0]
    mean = calc.summarise(rows, min_probe_f1)
    if len(good) < min_letters:
        log(f"absorption: only {len(good)} letters have a probe F1 above {min_probe_f1} "
            f"(--absorption-min-letters {min_letters}): no absorption score, as SAEBench")
        mean = {k: float("nan") for k in mean}
    first = {"mean_probe_f1": float(np.mean([r["f1_probe"] for r in rows])),
             "mean_first_letter_feature_f1": float(np.mean([r["f1_sparse_k1"] for r in rows])),
             "mean_split_features_f1": float(np.mean([r["f1_split_features"] for r in rows])),
             "num_letters_evaluated": len(good)}
    return {"rows": rows, "metrics": {"mean": mean, "first_letter": first},
            "words": {"vocabulary": n_vocab, "sampled": len(vocab), "train": len(train_w),
                      "test": len(test_w), "measured": len(absorb_prompts),
                      "read_at_own_token": at_word}}


def evaluate(run, args, *, log):
    from jsae.bench import Result
    from jsae.config import ConfigError

    if run.output_hook:
        raise ConfigError(f"absorption: the dictionary at {run.hook} writes to {run.output_hook}; "
                          "absorption needs one that reconstructs its own hook (pass --only without absorption)")
    res = measure(run.model, run.sae, run.hook, n_words=args.absorption_words, seed=args.seed,
                  max_k=args.absorption_max_k, f1_jump=args.absorption_f1_jump,
                  min_probe_f1=args.absorption_min_probe_f1, min_letters=args.absorption_min_letters,
                  epochs=args.absorption_epochs, batch_size=args.batch_size, log=log)
    config = {"model_name": run.model_name, "random_seed": args.seed,
              "f1_jump_threshold": args.absorption_f1_jump, "max_k_value": args.absorption_max_k,
              "prompt_template": "{word} has the first letter:", "prompt_token_pos": -6,
              "llm_batch_size": args.batch_size, "llm_dtype": "float32",
              "k_sparse_probe_l1_decay": 0.01, "k_sparse_probe_batch_size": l1_batch(res["words"]["train"]),
              "k_sparse_probe_num_epochs": args.absorption_epochs,
              "min_GT_probe_f1": args.absorption_min_probe_f1,
              "min_feats_for_eval": args.absorption_min_letters, "n_words": args.absorption_words}
    keep = ("first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
            "num_probe_true_positives", "num_split_features", "f1_probe", "f1_sparse_k1",
            "f1_split_features", "split_features")
    details = [{**{k: r[k] for k in keep}, "absorbed_words": r["absorbed_words"][:20]} for r in res["rows"]
               if r["f1_probe"] > args.absorption_min_probe_f1 and r["num_probe_true_positives"] > 0]
    return Result(config=config, metrics=res["metrics"], details=details,
                  unstructured={"words": res["words"], "all_letters": [{k: r[k] for k in keep} for r in res["rows"]]})

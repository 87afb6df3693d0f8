"""`jsae bench --only absorption`: SAEBench's first-letter absorption, on a tiny word-level model
whose dictionary has absorption planted (known words whose letter feature is silent and a
word feature carries the letter), checked against NumPy / torch / scikit-learn formulas and,
where its side venv exists, against the real sae-bench 0.6.0 on the same model and words."""

from __future__ import annotations

import json
import string

import jax.numpy as jnp
import numpy as np
import pytest
from test_steering_helpers import random_sae, tiny_params

from jsae.bench import _absorption_calc as calc
from jsae.bench import _absorption_data as data
from jsae.bench._absorption_probes import f1, fit_logistic, train_probes
from jsae.models.config import TransformerConfig

HOOK = "blocks.0.hook_resid_post"
N_PER_LETTER, N_ABSORBED = 40, 4
N_NOISE = 26  # D = 156, a multiple of the 4 heads (transformers checks)
D = 26 + 26 * N_ABSORBED + N_NOISE  # letter dims, one dim per absorbed word, shared noise dims
AMP = 5.0  # the letter's size at the hook: large margins, as real residual streams have
TEMPLATE_TOKENS = ["has", "the", "first", "letter", ":"]


def _words():
    rng = np.random.default_rng(5)
    out, seen = {}, set(TEMPLATE_TOKENS) | set(string.ascii_uppercase)
    for letter in string.ascii_lowercase:
        ws = []
        while len(ws) < N_PER_LETTER:
            w = letter + "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(2, 5))))
            if w not in seen:
                seen.add(w)
                ws.append(w)
        out[letter] = ws
    return out


WORDS = _words()
ABSORBED = {w for ws in WORDS.values() for w in ws[:N_ABSORBED]}
VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>", *TEMPLATE_TOKENS, *string.ascii_uppercase,
         *[w for ws in WORDS.values() for w in ws]]
HF_CONFIG = dict(
    vocab_size=len(VOCAB), hidden_size=D, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=128,
    query_pre_attn_scalar=8, rope_theta=1e4, rope_local_base_freq=1e4,
    layer_types=["full_attention", "full_attention"], rms_norm_eps=1e-6,
    max_position_embeddings=128, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
CFG = TransformerConfig(
    arch="gemma3", vocab_size=len(VOCAB), d_model=D, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, d_mlp=64, norm_eps=1e-6, rope_base=1e4, rope_local_base=1e4, sliding_window=128,
    layer_types=("global", "global"), attn_scale=8**-0.5, qk_norm=True, act="gelu_tanh",
    post_norms=True, embed_scale=D**0.5, bos_id=2, eos_id=1, pad_id=0, max_position=128)


def hf_tokenizer():
    """A word-level `tokenizers` tokenizer over VOCAB (whitespace and ':' split words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


class WordModel:
    """A 2-layer Gemma-3-shaped model whose embedding writes the word's first letter on one of
    26 orthogonal directions (and an absorbed word on a direction of its own); the blocks add
    little (post-norm scales 0.02), so the letter is linearly readable at HOOK."""

    def __init__(self):
        from jsae.models.tokenizer import Tokenizer

        rng = np.random.default_rng(0)
        self.cfg = CFG
        p = tiny_params(CFG, seed=1)
        for blk in p["blocks"]:
            blk["ln1_post"] = {"scale": jnp.full((D,), 0.02, jnp.float32)}
            blk["ln2_post"] = {"scale": jnp.full((D,), 0.02, jnp.float32)}
        E = rng.normal(0, 1.0, (len(VOCAB), D)) / np.sqrt(D)
        dims = {w: 26 + i for i, w in enumerate(sorted(ABSORBED))}
        for i, w in enumerate(VOCAB):
            if w.isalpha():  # every word, the template's and the answers' too
                e = np.zeros(D)
                e[string.ascii_lowercase.index(w[0].lower())] = 1.0
                e[26 + len(dims):] = 0.3 * rng.normal(0, 1, N_NOISE) / np.sqrt(N_NOISE)
                if w in dims:
                    e[dims[w]] = 1.0
                E[i] = AMP * e / np.sqrt(D)  # embed_scale sqrt(D) brings the letter to AMP
        p["embed"] = jnp.asarray(E, jnp.float32)
        self.params = p
        self.dims = dims
        self.tokenizer = Tokenizer(hf_tokenizer(), bos_id=2, eos_id=1, pad_id=0)
        self.name = "tiny-words"


def planted_sae(model):
    """A ReLU dictionary: features 0..25 the letters (silent on the absorbed words: their
    encoder rows subtract those words' own directions), 26.. one per absorbed word (fires on
    it alone; its decoder is the letter's direction), the rest random and quiet."""
    n_abs = len(model.dims)
    F = 26 + n_abs + 22
    sae = random_sae("relu", D, F, seed=3)
    s = float(sae.norm_scale)
    W_enc = np.zeros((D, F))
    W_dec = np.asarray(sae.params["W_dec"], np.float64).copy()
    b_enc = np.full(F, -5.0 * AMP * s)  # the random features never fire
    for li in range(26):
        W_enc[li, li] = 1.0
        W_dec[li] = 0.0
        W_dec[li, li] = 1.0
        b_enc[li] = -0.5 * AMP * s
    for w, dim in model.dims.items():
        li = string.ascii_lowercase.index(w[0])
        W_enc[dim, li] = -3.0
        f = 26 + (dim - 26)
        W_enc[dim, f] = 1.0
        b_enc[f] = -0.1 * AMP * s
        W_dec[f] = 0.0
        W_dec[f, li] = 1.0  # it writes the letter its word lost
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = dict(sae.params)
    p.update(W_enc=jnp.asarray(W_enc, jnp.float32), W_dec=jnp.asarray(W_dec, jnp.float32),
             b_enc=jnp.asarray(b_enc, jnp.float32), b_dec=jnp.zeros((D,), jnp.float32))
    return sae.replace(params=p)


@pytest.fixture(scope="module")
def planted():
    model = WordModel()
    return model, planted_sae(model)


# ---- pieces against independent formulas -----------------------------------------------------

def test_alpha_words_and_icl_prompt(planted):
    model, _ = planted
    words = data.alpha_words(model.tokenizer)
    assert words == [w for w in VOCAB if w.isalpha() and w.isascii()]
    rng = np.random.default_rng(0)
    cab = WORDS["c"][0]
    p = data.icl_prompt(cab, [WORDS["d"][0], WORDS["e"][0], cab, WORDS["f"][0]], rng, n_examples=2)
    lines = p.split("\n")
    assert lines[0] == "" and lines[-1] == f"{cab} has the first letter:" and len(lines) == 4
    for ln in lines[1:3]:
        w = ln.split()[0]
        assert w != cab and ln == f"{w} has the first letter: {w[0].upper()}"
    ids = model.tokenizer.encode(p)
    assert ids[0] == 2 and VOCAB[ids[data.TOKEN_POS]] == cab and 3 not in ids
    assert data.first_letter(" apple") == " A" and data.letter_index("Zed") == 25


def test_hook_activations_read_each_prompt_at_its_own_word(planted):
    from jsae.models.transformer import forward

    model, _ = planted
    prompts = [f"\n{WORDS['c'][0]} has the first letter:",
               f"\nA has the first letter: A\n{WORDS['d'][1]} has the first letter:"]
    got, read = data.hook_activations(model, HOOK, prompts, batch_size=4)
    assert [VOCAB[i] for i in read] == [WORDS["c"][0], WORDS["d"][1]]
    assert data.own_token(model.tokenizer, WORDS["d"][1]) == read[1]
    assert data.own_token(model.tokenizer, "has the") == -1
    for p, g in zip(prompts, got):
        ids = model.tokenizer.encode(p)
        ref = forward(CFG, model.params, jnp.asarray([ids]), capture=(HOOK,)).activations[HOOK][0, -6]
        np.testing.assert_allclose(g, np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_fit_logistic_matches_sklearn_balanced_l2():
    lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)) * [1, 2, 0.5, 0]  # a constant (dead) feature too
    y = x[:, 0] + 0.5 * x[:, 1] + rng.normal(size=300) > 1.2  # unbalanced classes
    w, b = fit_logistic(x, y)
    ref = lm.LogisticRegression(max_iter=5000, class_weight="balanced", tol=1e-10).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-4, atol=1e-6)
    assert b == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-6)
    assert f1(x @ w + b > 0, y) == pytest.approx(f1(ref.predict(x), y))


def test_train_probes_match_torch_adam_bce_pos_weight():
    """Full-batch (no shuffling to match): the same init, loss (pos_weight, L1), Adam with L2
    decay and per-epoch exponential learning rate as SAEBench's torch loop."""
    torch = pytest.importorskip("torch")
    import jax

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    lab = rng.integers(0, 3, 50)
    W, b = train_probes(x, lab, 3, seed=4, epochs=7, batch_size=64, lr=0.05, end_lr=1e-3,
                        weight_decay=1e-3, l1=0.01)
    kw, kb, _ = jax.random.split(jax.random.PRNGKey(4), 3)
    bound = 1 / np.sqrt(6)
    lin = torch.nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(jax.random.uniform(kw, (3, 6), minval=-bound, maxval=bound))))
        lin.bias.copy_(torch.from_numpy(np.asarray(jax.random.uniform(kb, (3,), minval=-bound, maxval=bound))))
    y = torch.nn.functional.one_hot(torch.from_numpy(lab), 3).float()
    pw = (len(y) - y.sum(0)) / y.sum(0)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=np.exp(np.log(1e-3 / 0.05) / 7))
    xt = torch.from_numpy(x)
    for _ in range(7):
        opt.zero_grad()
        loss = torch.nn.BCEWithLogitsLoss(pos_weight=pw)(lin(xt), y) + 0.01 * lin.weight.abs().sum(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
    np.testing.assert_allclose(W, lin.weight.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, lin.bias.detach().numpy(), rtol=1e-4, atol=1e-5)


def _reference_word(a, z, p, cos, main):
    """SAEBench's per-word rules, transcribed one word at a time with Python floats."""
    p = p / np.linalg.norm(p)
    P = float(a @ p)
    q = z * cos
    main_q = float(q[main].sum())
    cand = sorted((float(q[f]) for f in range(len(q)) if f not in main and cos[f] >= 0.1 and q[f] > 0),
                  reverse=True)[:3]
    tot = sum(cand)
    if main_q >= P or tot / P < 0.4:
        frac = 0.0
    elif main_q <= 0:
        frac = 1.0
    else:
        ab = min(tot, P - main_q)
        frac = min(max(ab / (ab + main_q), 0.0), 1.0)
    top = int(np.argmax(q))
    full = (all(z[m] < 1e-8 for m in main) and cos[top] >= 0.025 and P >= 0 and q[top] / P >= 0.4)
    return frac, full


def test_absorption_formulas_match_a_word_by_word_transcription():
    rng = np.random.default_rng(2)
    N, Dm, F = 400, 8, 30
    W_dec = rng.normal(size=(F, Dm))
    p = rng.normal(size=Dm)
    cos = calc.cosines(p, W_dec)
    np.testing.assert_allclose(cos, [w @ p / np.linalg.norm(w) / np.linalg.norm(p) for w in W_dec])
    a = rng.normal(size=(N, Dm)) + 2 * p / np.linalg.norm(p)
    z = np.maximum(rng.normal(size=(N, F)) - 0.8, 0)
    z[: N // 3, [1, 4]] = 0.0  # main features silent: absorption possible
    frac, full = calc.absorption(a, z, p, cos, [1, 4])
    ref = [_reference_word(a[i], z[i], p, cos, [1, 4]) for i in range(N)]
    np.testing.assert_allclose(frac, [r[0] for r in ref], atol=1e-12)
    np.testing.assert_array_equal(full, [r[1] for r in ref])
    assert 0 < full.sum() < N and 0 < (frac == 1).sum() and 0 < ((frac > 0) & (frac < 1)).sum()


def test_split_features_and_summary():
    assert calc.split_features([0.5, 0.6, 0.62, 0.9], [[3], [3, 7], [3, 7, 9], [3, 7, 9, 1]]) == [3, 7]
    assert calc.split_features([0.5, 0.52], [[3], [3, 7]]) == [3]
    rows = [{"num_probe_true_positives": 5, "f1_probe": f, "mean_absorption_fraction": a,
             "full_absorption_rate": r, "num_split_features": n}
            for f, a, r, n in [(0.9, 0.1, 0.0, 1), (0.7, 0.3, 0.2, 2), (0.5, 0.9, 0.9, 5)]]
    m = calc.summarise(rows, 0.6)
    assert m["mean_absorption_fraction_score"] == pytest.approx(0.2)
    assert m["mean_full_absorption_score"] == pytest.approx(0.1)
    assert m["mean_num_split_features"] == pytest.approx(1.5)
    assert m["std_dev_absorption_fraction_score"] == pytest.approx(np.std([0.1, 0.3], ddof=1))


# ---- the whole measure on the planted dictionary ----------------------------------------------

@pytest.fixture(scope="module")
def measured(planted):
    from jsae.bench.absorption import measure

    model, sae = planted
    return measure(model, sae, HOOK, n_words=0, seed=0, batch_size=64, log=lambda m: None)


def test_measure_finds_the_planted_letters_and_absorbed_words(measured):
    rows = {r["first_letter"]: r for r in measured["rows"]}
    assert measured["words"]["vocabulary"] == len([w for w in VOCAB if w.isalpha()])
    assert measured["words"]["read_at_own_token"] == 1.0
    found = planted_measured = 0
    for li, letter in enumerate(string.ascii_lowercase):
        r = rows[letter]
        assert r["f1_probe"] > 0.8, r
        assert r["split_features"] == [li]  # the letter feature alone: nothing splits
        measured_words = r["measured_words"]
        assert measured_words and all(w[0].lower() == letter for w in measured_words)
        expect = {w for w in measured_words if w in ABSORBED}
        assert set(r["absorbed_words"]) <= expect, letter  # never a word that was not planted
        found += len(r["absorbed_words"])
        planted_measured += len(expect)
        n = r["num_probe_true_positives"]
        assert r["full_absorption_rate"] == pytest.approx(len(r["absorbed_words"]) / n)
        # an absorbed word's letter feature is silent: its absorption fraction is 1, others' 0
        assert r["mean_absorption_fraction"] == pytest.approx(len(r["absorbed_words"]) / n)
    assert found >= 0.9 * planted_measured and planted_measured > 26
    m = measured["metrics"]["mean"]
    share = np.mean([len([w for w in rows[c]["measured_words"] if w in ABSORBED])
                     / rows[c]["num_probe_true_positives"] for c in string.ascii_lowercase])
    assert m["mean_full_absorption_score"] == pytest.approx(share, abs=0.02) and 0.05 < share < 0.3
    assert m["mean_absorption_fraction_score"] == pytest.approx(m["mean_full_absorption_score"])
    assert m["mean_num_split_features"] == 1.0
    assert measured["metrics"]["first_letter"]["mean_first_letter_feature_f1"] > 0.8


def test_bench_cli_writes_saebench_layout(planted, tmp_path, monkeypatch, capsys):
    import jsae.models
    from jsae import cli
    from jsae.config import RunConfig, dump
    from jsae.sae.io import save_sae

    model, sae = planted
    cfg = RunConfig()
    cfg.model.name = "tiny-words"
    cfg.model.hooks = [HOOK]
    dump(cfg, tmp_path / "config.yaml")
    save_sae(sae, tmp_path / "saes" / HOOK, metadata={"hook_name": HOOK})
    monkeypatch.setattr(jsae.models, "load", lambda name, dtype="float32": model)
    out = tmp_path / "bench"
    assert cli.main(["bench", str(tmp_path), "--only", "absorption", "--out", str(out),
                     "--absorption-words", "200", "--absorption-epochs", "10",
                     "--absorption-min-letters", "1", "--batch-size", "64"]) == 0
    doc = json.loads((out / "absorption_first_letter.json").read_text())
    assert doc["eval_type_id"] == "absorption_first_letter"
    mean = doc["eval_result_metrics"]["mean"]
    assert set(mean) >= {"mean_absorption_fraction_score", "mean_full_absorption_score",
                         "mean_num_split_features"}
    assert doc["eval_config"]["max_k_value"] == 10 and doc["eval_config"]["prompt_token_pos"] == -6
    d0 = doc["eval_result_details"][0]
    assert set(d0) >= {"first_letter", "mean_absorption_fraction", "full_absorption_rate",
                       "num_full_absorption", "num_probe_true_positives", "num_split_features"}
    assert "absorption" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--absorption-words", "10"], "--absorption-words"),
    (["--absorption-max-k", "0"], "--absorption-max-k"),
    (["--absorption-min-letters", "27"], "--absorption-min-letters"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, needle):
    from jsae import cli

    assert cli.main(["bench", str(tmp_path), "--only", "absorption", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


# ---- the real sae-bench -----------------------------------------------------------------------

@pytest.mark.slow
def test_real_saebench_absorption_agrees(planted, measured, tmp_path):
    """sae-bench 0.6.0's absorption experiments (TransformerLens model converted from the same
    weights, the dictionary exported as a SAELens folder) on the same vocabulary: the same
    words, letter features and per-word verdicts, and scores within sampling tolerance (each
    side draws its own 80/20 split and prompts)."""
    from saebench_side import ABSORPTION_SCRIPT, run_saebench, saebench_python
    from safetensors.numpy import save_file

    from jsae.bench.absorption import l1_batch
    from jsae.export.saelens import save_saelens
    from jsae.models.convert import params_to_hf

    saebench_python()
    model, sae = planted
    save_file(params_to_hf(CFG, model.params), str(tmp_path / "model.safetensors"))
    hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    save_saelens(sae, tmp_path / "sae", hook_name=HOOK, model_name="tiny-words")
    (tmp_path / "settings.json").write_text(json.dumps({
        "hf_config": HF_CONFIG, "layer": 0, "seed": 0,
        "k_sparse_probe_batch_size": l1_batch(measured["words"]["train"])}))
    ref = run_saebench(ABSORPTION_SCRIPT, tmp_path)
    assert ref["vocabulary"] == sorted(data.alpha_words(model.tokenizer))
    rows = {r["first_letter"]: r for r in measured["rows"]}
    for li, letter in enumerate(string.ascii_lowercase):
        assert ref["f1_probe"][letter] > 0.8 and rows[letter]["f1_probe"] > 0.8
        assert ref["letters"][letter]["split_features"] == rows[letter]["split_features"] == [li]
    # per word: SAEBench flags planted words only, and the words both sides measured get the
    # same verdict
    theirs = {w for w, (_, full) in ref["words"].items() if full}
    assert theirs <= ABSORBED and len(theirs) >= 0.9 * len(ABSORBED & set(ref["words"]))
    ours = {w: w in r["absorbed_words"] for r in measured["rows"] for w in r["measured_words"]}
    both = set(ours) & set(ref["words"])
    assert len(both) > 20
    agree = [ours[w] == ref["words"][w][1] for w in both]
    assert np.mean(agree) >= 0.95, [w for w in both if ours[w] != ref["words"][w][1]]
    print("jsae", measured["metrics"]["mean"], "sae-bench", ref["mean"])
    for key in ("mean_absorption_fraction_score", "mean_full_absorption_score"):
        assert measured["metrics"]["mean"][key] == pytest.approx(ref["mean"][key], abs=0.1), key
    assert ref["mean"]["mean_num_split_features"] == measured["metrics"]["mean"]["mean_num_split_features"]

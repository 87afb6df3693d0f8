"""The `saebench` block of eval.json carries SAELens' / SAEBench's definitions.

A tiny causal LM (embeddings, a causal running mean, a hook, a second causal mean, an MLP,
unembedding) and a random SAE; jsae's `downstream_metrics` is compared with

- the formulas of SAELens 6.5x `sae_lens/evals.py`, transcribed to NumPy here:
  `standard_replacement_hook` splices the SAE only where the token is not ignored (BOS),
  `standard_zero_ablate_hook` zeroes the activation at *every* position, CE / KL are means over
  the non-ignored positions, `ce_loss_score = (ce_abl - ce_sae) / (ce_abl - ce_clean)`,
  `kl_div_score = (kl_abl - kl_sae) / kl_abl`, `mse` = mean over tokens of sum_d (x - x_hat)^2;
- and, when a Python with sae_lens is available (JSAE_SAELENS_PYTHON, as CI's `.ci-saelens`),
  sae_lens' own `get_downstream_reconstruction_metrics` on the same model and SAE.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from saelens_side import run_saelens, saelens_python

from jsae.evals.downstream import downstream_metrics
from jsae.evals.reconstruction import ReconstructionStats
from jsae.sae.core import SAESpec, decode, encode
from jsae.sae.init import init_sae

HOOK = "blocks.0.hook_resid_post"
V, D, B, T, BOS = 13, 8, 3, 7, 1


def _weights(seed=0):
    r = np.random.default_rng(seed)
    return {"E": r.normal(size=(V, D)), "W1": r.normal(size=(D, 16)) / 3,
            "W2": r.normal(size=(16, D)) / 4, "U": r.normal(size=(D, V))}


def _causal_mean(h):
    return np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)[None, :, None]


def np_logits(w, tokens, hook_fn=None):
    """The tiny LM in NumPy (float64): the reference side."""
    h = w["E"][tokens]
    h = h + _causal_mean(h)
    if hook_fn is not None:
        h = hook_fn(h)
    h = h + _causal_mean(h)
    h = h + np.maximum(h @ w["W1"], 0) @ w["W2"]
    return h @ w["U"]


def jax_forward(model_cfg, params, tokens, interventions=None, attention_mask=None):
    """The same LM with jsae's forward signature."""
    w = params
    h = w["E"][tokens]
    cm = lambda a: jnp.cumsum(a, axis=1) / jnp.arange(1, a.shape[1] + 1)[None, :, None]  # noqa
    h = h + cm(h)
    if interventions and HOOK in interventions:
        h = interventions[HOOK](h)
    h = h + cm(h)
    h = h + jnp.maximum(h @ w["W1"], 0) @ w["W2"]
    return SimpleNamespace(logits=h @ w["U"])


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def saelens_reference(w, sae, tokens):
    """SAELens 6.5x's get_recons_loss + get_downstream_reconstruction_metrics, in NumPy."""
    mask = tokens != BOS  # ignore_tokens={bos}

    def recon(h):
        x_hat = np.asarray(decode(sae, encode(sae, jnp.asarray(h, jnp.float32))), np.float64)
        return np.where(mask[..., None], x_hat, h)

    runs = {"clean": np_logits(w, tokens), "sae": np_logits(w, tokens, recon),
            "abl": np_logits(w, tokens, np.zeros_like)}
    lp = {k: _log_softmax(v) for k, v in runs.items()}
    ce = {k: -np.take_along_axis(v[:, :-1], tokens[:, 1:, None], -1)[..., 0]
          for k, v in lp.items()}
    p = np.exp(lp["clean"])
    kl = {k: (p * (lp["clean"] - lp[k])).sum(-1) for k in ("sae", "abl")}
    m_ce, m_kl = mask[:, :-1], mask
    ce = {k: v[m_ce].mean() for k, v in ce.items()}
    kl = {k: v[m_kl].mean() for k, v in kl.items()}
    return {"ce_loss_score": (ce["abl"] - ce["sae"]) / (ce["abl"] - ce["clean"]),
            "kl_div_score": (kl["abl"] - kl["sae"]) / kl["abl"],
            "ce_loss_with_ablation": ce["abl"], "kl_div_with_ablation": kl["abl"],
            "ce_loss_with_sae": ce["sae"], "ce_loss_without_sae": ce["clean"],
            "kl_div_with_sae": kl["sae"]}


@pytest.fixture(scope="module")
def setup():
    w = _weights()
    tokens = np.random.default_rng(1).integers(2, V, size=(B, T))
    tokens[:, 0] = BOS
    tokens[1, 4] = BOS  # a document separator: SAELens counts the CE position before it
    h = w["E"][tokens]
    acts = (h + _causal_mean(h))[tokens != BOS].astype(np.float32)
    sae = init_sae(jax.random.key(0), SAESpec("topk", d_in=D, d_sae=32, k=3), acts)
    model = SimpleNamespace(cfg=None, params={k: jnp.asarray(v, jnp.float32) for k, v in w.items()})
    got = downstream_metrics(model, {HOOK: sae}, [(tokens, tokens != BOS)],
                             {HOOK: acts.mean(0)}, forward=jax_forward)[HOOK]
    return w, tokens, sae, acts, got


def test_ce_and_kl_scores_are_saelens_definitions(setup):
    w, tokens, sae, _, got = setup
    ref = saelens_reference(w, sae, tokens)
    assert got["ce_loss_score"] == pytest.approx(ref["ce_loss_score"], rel=1e-4, abs=1e-5)
    assert got["kl_div_score"] == pytest.approx(ref["kl_div_score"], rel=1e-4, abs=1e-5)
    assert got["ce_zero_abl_all"] == pytest.approx(ref["ce_loss_with_ablation"], rel=1e-5)
    assert got["kl_zero_abl_all"] == pytest.approx(ref["kl_div_with_ablation"], rel=1e-5)
    assert got["ce_spliced_saelens"] == pytest.approx(ref["ce_loss_with_sae"], rel=1e-5)
    assert got["ce_clean_saelens"] == pytest.approx(ref["ce_loss_without_sae"], rel=1e-5)
    # jsae's own CE also skips the position whose target is the separator BOS (SAELens keeps it)
    assert got["ce_tokens"] == (T - 2) * B - 2
    # jsae's own zero ablation (SAE positions only, BOS kept) is a different number, kept
    # under jsae's own name.
    assert abs(got["ce_zero_abl"] - got["ce_zero_abl_all"]) > 1e-3
    assert got["ce_recovered_zero"] != pytest.approx(got["ce_loss_score"], abs=1e-4)


def test_mse_per_token_is_saelens_mse(setup):
    _, _, sae, acts, _ = setup
    st = ReconstructionStats()
    from jsae.evals.reconstruction import batch_sums

    st.add_sums(jax.device_get(batch_sums(sae, jnp.asarray(acts), jnp.ones(len(acts), bool))))
    r = st.result()
    x_hat = np.asarray(decode(sae, encode(sae, jnp.asarray(acts))), np.float64)
    rss = ((acts - x_hat) ** 2).sum(-1)  # SAELens: resid_sum_of_squares per token
    assert r["mse_per_token"] == pytest.approx(rss.mean(), rel=1e-5)
    assert r["mse"] == pytest.approx(rss.mean() / D, rel=1e-5)  # jsae: per element


_SAELENS_SCRIPT = r"""
import json, sys
import numpy as np, torch
from types import SimpleNamespace
from sae_lens import SAE
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.training.activation_scaler import ActivationScaler

d = sys.argv[1]
w = {k: torch.tensor(v) for k, v in np.load(d + "/w.npz").items()}
tokens = torch.tensor(np.load(d + "/tokens.npy"))
hook_name = json.load(open(d + "/hook.json"))["hook"]
sae = SAE.load_from_disk(d + "/sae").to(torch.float64)

def cm(h):
    return torch.cumsum(h, 1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]

class Model:
    def run_with_cache(self, toks, names_filter=(), **kw):
        h = w["E"][toks]
        return None, {hook_name: h + cm(h)}
    def _run(self, toks, hook=None):
        h = w["E"][toks]
        h = h + cm(h)
        if hook is not None:
            h = hook(h, None)
        h = h + cm(h)
        h = h + torch.relu(h @ w["W1"]) @ w["W2"]
        logits = h @ w["U"]
        lp = torch.log_softmax(logits, -1)
        loss = -lp[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]
        return logits, loss
    def __call__(self, toks, return_type="both", loss_per_token=True, **kw):
        return self._run(toks)
    def run_with_hooks(self, toks, return_type="both", fwd_hooks=(), loss_per_token=True, **kw):
        (name, fn), = fwd_hooks
        assert name == hook_name
        return self._run(toks, fn)

store = SimpleNamespace(get_batch_tokens=lambda n: tokens)
bos = [int(json.load(open(d + "/hook.json"))["bos"])]
m = get_downstream_reconstruction_metrics(sae, Model(), store, ActivationScaler(),
                                          compute_kl=True, compute_ce_loss=True, n_batches=1,
                                          eval_batch_size_prompts=len(tokens), ignore_tokens=bos)
r, _ = get_sparsity_and_variance_metrics(sae, Model(), store, ActivationScaler(), n_batches=1,
                                         compute_l2_norms=True, compute_sparsity_metrics=True,
                                         compute_variance_metrics=True,
                                         compute_featurewise_density_statistics=False,
                                         eval_batch_size_prompts=len(tokens), model_kwargs={},
                                         ignore_tokens=bos)
print(json.dumps({k: float(v) for k, v in {**m, **r}.items()}))
"""


@pytest.mark.slow
def test_scores_match_real_saelens(setup, tmp_path):
    saelens_python()
    from jsae.export.saelens import save_saelens

    w, tokens, sae, acts, got = setup
    np.savez(tmp_path / "w.npz", **w)
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "hook.json").write_text(json.dumps({"hook": HOOK, "bos": BOS}))
    save_saelens(sae, tmp_path / "sae", hook_name=HOOK, model_name="tiny")
    ref = run_saelens(_SAELENS_SCRIPT, tmp_path)
    for key, ours in (("ce_loss_score", "ce_loss_score"), ("kl_div_score", "kl_div_score"),
                      ("ce_loss_with_ablation", "ce_zero_abl_all"),
                      ("kl_div_with_ablation", "kl_zero_abl_all"),
                      ("ce_loss_with_sae", "ce_spliced_saelens"),
                      ("ce_loss_without_sae", "ce_clean_saelens")):
        assert got[ours] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    # eval.json's saebench block on the same activations (BOS ignored) = sae_lens' numbers
    from jsae.evals.evaluate import saebench_view
    from jsae.evals.reconstruction import batch_sums

    st = ReconstructionStats()
    st.add_sums(jax.device_get(batch_sums(sae, jnp.asarray(acts), jnp.ones(len(acts), bool))))
    view = saebench_view({**st.result(), **got})
    flat = {k: v for cat in view.values() for k, v in cat.items()}
    for key in ("mse", "explained_variance", "cossim", "l0", "l1", "l2_norm_in", "l2_norm_out",
                "l2_ratio", "relative_reconstruction_bias", "ce_loss_score", "kl_div_score"):
        assert flat[key] == pytest.approx(ref[key], rel=2e-4, abs=1e-5), key

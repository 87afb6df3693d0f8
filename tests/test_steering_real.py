"""Causal effect of steering on the real Gemma 3 270M, with a small dictionary trained here.

A TopK SAE (1024 latents, k=16) is trained for 250 steps on ~4k layer-6 residual activations of
the offline corpus. For the live features that reach the highest codes (firing on 0.2%-5% of
tokens; chosen by that rule alone, before anything is measured), with T = the 10 tokens its decoder
direction promotes most through the unembedding (ranked among the tokens of the corpus sample):

- clamping the feature to 4x its largest code raises the log-probability of T at the next
  position of neutral prompts, relative to baseline;
- ablating it lowers the log-probability of T at the positions where it fires.

Log-probabilities are measured relative to the mean log-probability over the corpus vocabulary
(``log p(t) - mean_v log p(v)``, i.e. centred logits). Raw log-probabilities of such unlikely
tokens (~ -15 to -20 nats) mostly track the model's overall confidence: any edit that flattens
the distribution raises them all, which hides the feature-specific effect.
"""

from __future__ import annotations

import numpy as np
import pytest

HOOK = "blocks.6.hook_resid_post"
PROMPTS = ["I think that", "The next thing is", "She said it was", "In the morning we", "This is a",
           "They went to the", "It is known for its", "My favourite"]


def _train_sae(acts, steps=250, seed=0):
    import jax
    import jax.numpy as jnp
    import optax

    from jsae.sae import SAESpec, init_sae, sae_loss

    sae = init_sae(jax.random.PRNGKey(seed), SAESpec("topk", acts.shape[1], 1024, k=16), acts[:2048],
                   b_dec_init="mean")
    opt = optax.adam(2e-3)

    @jax.jit
    def step(sae, st, x):
        def loss(p):
            return sae_loss(sae.replace(params=p), x * sae.norm_scale, sparsity_coef=0.0)[0]

        g = jax.grad(loss)(sae.params)
        u, st = opt.update(g, st, sae.params)
        p = optax.apply_updates(sae.params, u)
        p["W_dec"] = p["W_dec"] / jnp.linalg.norm(p["W_dec"], axis=-1, keepdims=True)
        return sae.replace(params=p), st

    st = opt.init(sae.params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        sae, st = step(sae, st, jnp.asarray(acts[rng.integers(0, len(acts), 512)]))
    return sae


@pytest.mark.slow
def test_clamp_raises_and_ablation_lowers_top_logit_tokens():
    import jax.numpy as jnp

    from jsae import steering
    from jsae.analysis import corpus_contexts, hook_activations, logit_effects
    from jsae.models import forward, load
    from jsae.sae import encode

    lm = load("gemma-3-270m")
    toks, mask = corpus_contexts(lm.tokenizer, 64, 64, seed=3)
    A = np.concatenate([np.asarray(hook_activations(lm, HOOK, toks[i : i + 16])) for i in range(0, len(toks), 16)])
    sae = _train_sae(A[mask])

    Z = np.asarray(encode(sae, jnp.asarray(A))) * mask[..., None]  # [N, T, F]
    freq, zmax = (Z > 0).sum((0, 1)) / mask.sum(), Z.max((0, 1))
    cands = np.flatnonzero((freq > 0.002) & (freq < 0.05))
    feats = cands[np.argsort(-zmax[cands])][:3]
    assert len(feats) == 3
    vocab = np.unique(toks[mask])
    col = {int(v): i for i, v in enumerate(vocab)}
    le = logit_effects(lm, sae, feats, k=10, vocab=vocab)
    V = jnp.asarray(vocab)

    def centred(tokens, attn, interventions, where, top):
        """Mean over the selected positions of mean_{t in top} log p(t) - mean_v log p(v)."""
        logits = forward(lm.cfg, lm.params, tokens, attention_mask=attn, interventions=interventions).logits
        lv = np.asarray(logits[..., V])[where]  # [n, |vocab|]; the softmax normaliser cancels
        return float((lv[:, top].mean(-1) - lv.mean(-1)).mean())

    ptoks, pmask = lm.to_tokens(PROMPTS, padding_side="left")
    last = np.zeros(ptoks.shape, bool)
    last[:, -1] = True
    for j, f in enumerate(feats):
        f = int(f)
        top = [col[int(i)] for i in le.top_ids[j]]
        base = centred(ptoks, pmask, None, last, top)
        clamped = centred(ptoks, pmask, {HOOK: steering.clamp(sae, f, 4 * float(zmax[f]))}, last, top)
        assert clamped > base + 0.5, (f, base, clamped)

        ctx = np.argsort(-Z[..., f].max(1))[:4]  # the contexts where it fires most
        fires = Z[ctx, :, f] > 0
        assert fires.sum() >= 3
        base = centred(toks[ctx], None, None, fires, top)
        ablated = centred(toks[ctx], None, {HOOK: steering.ablate(sae, f)}, fires, top)
        assert ablated < base - 0.1, (f, base, ablated)

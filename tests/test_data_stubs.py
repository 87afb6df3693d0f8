"""A tiny stand-in LM with the jsae.models API (cfg, params, tokenizer, forward) for data tests.

Imported by the other test_data_* files; it holds no tests itself.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TRACED_LAYERS = []  # layers run by each trace of stub_forward (to check early stopping)


@dataclasses.dataclass(frozen=True)
class StubCfg:
    d_model: int = 16
    n_layers: int = 4
    vocab_size: int = 300


class StubTokenizer:
    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True):
        ids = [3 + (b % 290) for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids

    def encode_batch(self, texts, add_bos=True):
        return [self.encode(t, add_bos) for t in texts]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


@dataclasses.dataclass
class StubModel:
    cfg: StubCfg
    params: dict
    tokenizer: StubTokenizer
    name: str = "stub"


def make_stub(d_model=16, n_layers=4, seed=0):
    cfg = StubCfg(d_model, n_layers)
    k = jax.random.split(jax.random.PRNGKey(seed), n_layers + 1)
    params = {
        "embed": jax.random.normal(k[0], (cfg.vocab_size, d_model)),
        "blocks": [
            jax.random.normal(k[i + 1], (d_model, d_model)) / np.sqrt(d_model)
            for i in range(n_layers)
        ],
    }
    return StubModel(cfg, params, StubTokenizer())


def stub_forward(cfg, params, tokens, *, capture=(), stop_after_capture=False, **_):
    layers = [int(h.split(".")[1]) for h in capture]
    n_run = max(layers) + 1 if (stop_after_capture and capture) else cfg.n_layers
    TRACED_LAYERS.append(n_run)
    x = params["embed"][tokens]
    acts = {}
    T = tokens.shape[1]
    for i in range(n_run):
        acts[f"blocks.{i}.hook_resid_pre"] = x
        ctx = jnp.cumsum(x, axis=1) / jnp.arange(1, T + 1)[None, :, None]  # causal mixing
        x = x + jnp.tanh(ctx @ params["blocks"][i])
        acts[f"blocks.{i}.hook_resid_post"] = x
    out = {h: acts[h] for h in capture}

    class Out:
        pass

    o = Out()
    o.activations, o.logits = out, None
    return o

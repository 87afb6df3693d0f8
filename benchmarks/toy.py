"""Toy inputs for the benchmarks' ``--smoke`` modes: a random Gemma 3 shaped like the real one
(sliding and global layers, QK-norm, sandwich norms, GLU) but small, saved as an HF folder with a
character-level tokenizer, and a small text corpus. `jsae.models.load(folder)`, the `jsae` CLI
(`--set model.name=FOLDER`) and transformers all load the folder, so a smoke run goes through the
same code as the real benchmark, in seconds, with nothing downloaded.

    python benchmarks/toy.py OUT      # writes OUT/model (HF folder) and OUT/corpus.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# Gemma 3 270M's layout in miniature: 8 layers (5 sliding, 1 global, 2 sliding), so the
# benchmarks' layer-6 hooks exist; d_model 160 so that a 16x dictionary (2,560 latents) holds
# configs/matryoshka.yaml's prefixes (128, 512, 2048).
TOY = {"d_model": 160, "n_layers": 8, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32,
       "d_mlp": 320, "vocab": 128, "sliding_window": 16}

WORDS = ("the a of and to in is was for on that with as by at from it an be this are which "
         "river city king music war science light water stone bridge golden gate paris ocean "
         "north south history language music garden winter summer machine number planet "
         "built named first largest early modern ancient famous small great").split()


def hf_config(t: dict = TOY) -> dict:
    L = t["n_layers"]
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": t["vocab"], "hidden_size": t["d_model"], "intermediate_size": t["d_mlp"],
        "num_hidden_layers": L, "num_attention_heads": t["n_heads"],
        "num_key_value_heads": t["n_kv_heads"], "head_dim": t["head_dim"],
        "sliding_window": t["sliding_window"], "query_pre_attn_scalar": t["head_dim"],
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(L)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "torch_dtype": "float32",
    }


def hf_tensors(t: dict = TOY, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the HF Gemma 3 names (norm weights near 0: Gemma scales by 1 + w)."""
    rng = np.random.default_rng(seed)
    D, H, K, Dh, F, V = (t["d_model"], t["n_heads"], t["n_kv_heads"], t["head_dim"], t["d_mlp"],
                         t["vocab"])

    def w(*shape):
        return rng.normal(0, shape[-1] ** -0.5, shape)

    def norm(n):
        return 0.1 * rng.normal(size=n)

    out = {"model.embed_tokens.weight": rng.normal(0, D ** -0.5, (V, D)), "model.norm.weight": norm(D)}
    for i in range(t["n_layers"]):
        b = f"model.layers.{i}."
        out |= {
            b + "self_attn.q_proj.weight": w(H * Dh, D), b + "self_attn.k_proj.weight": w(K * Dh, D),
            b + "self_attn.v_proj.weight": w(K * Dh, D), b + "self_attn.o_proj.weight": w(D, H * Dh),
            b + "self_attn.q_norm.weight": norm(Dh), b + "self_attn.k_norm.weight": norm(Dh),
            b + "mlp.gate_proj.weight": w(F, D), b + "mlp.up_proj.weight": w(F, D),
            b + "mlp.down_proj.weight": w(D, F),
            b + "input_layernorm.weight": norm(D), b + "post_attention_layernorm.weight": norm(D),
            b + "pre_feedforward_layernorm.weight": norm(D),
            b + "post_feedforward_layernorm.weight": norm(D),
        }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_model(folder: str | Path, seed: int = 0) -> Path:
    """The toy Gemma 3 as an HF folder: config.json, model.safetensors, tokenizer.json."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(), indent=1))
    save_file(hf_tensors(seed=seed), str(d / "model.safetensors"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= TOY["vocab"]
    Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))
    return d


def write_corpus(path: str | Path, n_docs: int = 400, seed: int = 0) -> Path:
    """``n_docs`` documents of random words, one JSON line each (`data.dataset=files`)."""
    rng = np.random.default_rng(seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for _ in range(n_docs):
            words = rng.choice(WORDS, size=int(rng.integers(20, 80)))
            f.write(json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n")
    return p


def smoke_sets(folder: str | Path, corpus: str | Path) -> list[str]:
    """`jsae` CLI overrides that point a config at the toy model and corpus."""
    return [f"model.name={folder}", "data.dataset=files", f"data.path={corpus}",
            "data.shuffle_buffer=4096", "data.holdout_fraction=0.1"]


def model_or_toy(model: str | None, prefix: str) -> tuple[str, str, list[str]]:
    """(a temporary folder removed at exit, the model, its data overrides): ``model`` with the
    config's text, or (``None``, --smoke) the toy model and corpus written into the folder."""
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    if model is not None:
        return tmp, model, [f"model.name={model}"]
    folder = str(write_model(Path(tmp) / "model"))
    return tmp, folder, smoke_sets(folder, write_corpus(Path(tmp) / "c.jsonl"))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/toy")
    print(write_model(out / "model"), write_corpus(out / "corpus.jsonl"))

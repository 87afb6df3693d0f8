"""Tokenizers without torch: from a GGUF file's metadata or from an HF `tokenizer.json`.

`Tokenizer` wraps a `tokenizers.Tokenizer` and handles BOS itself (`encode(text, add_bos=True)`), so
the same code serves GGUF vocabularies, HF folders and models whose HF tokenizer adds no BOS.

The GGUF -> `tokenizers` conversion follows what transformers does for the same files (its GGUF
path imports torch, so it is rebuilt here): Gemma files get a SentencePiece-style BPE with byte
fallback whose merges are recovered from the vocabulary in file order; byte-level BPE files
("gpt2" tokenizer model: Llama 3, SmolLM2, Qwen2) use the merges stored in the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

META_FILE = "jsae_tokenizer.json"


class Tokenizer:
    """Text <-> token ids. `bos_id`, `eos_id`, `pad_id` may be None where a model has none."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        pad_id: Optional[int] = None,
        add_bos: bool = True,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos_default = add_bos

    # ---- encode / decode ----
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        pre = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [pre + e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"

    # ---- files ----
    def meta(self) -> dict:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "add_bos": self.add_bos_default}

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        (d / META_FILE).write_text(json.dumps(self.meta()))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, config: Optional[Mapping[str, Any]] = None) -> Tokenizer:
        """A folder with `tokenizer.json` (plus jsae's meta file, or HF's `tokenizer_config.json` /
        `config.json` for the special ids)."""
        d = Path(directory)
        f = d / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        backend = HFTokenizer.from_file(str(f))
        if (d / META_FILE).exists():
            meta = json.loads((d / META_FILE).read_text())
            return cls(backend, **{k: meta.get(k) for k in ("bos_id", "eos_id", "pad_id")}, add_bos=meta.get("add_bos", True))
        return cls.from_hf_backend(backend, d, config)

    @classmethod
    def from_hf_backend(cls, backend: HFTokenizer, d: Path, config: Optional[Mapping[str, Any]] = None) -> Tokenizer:
        tcfg: dict = {}
        if (d / "tokenizer_config.json").exists():
            tcfg = json.loads((d / "tokenizer_config.json").read_text())
        if config is None and (d / "config.json").exists():
            config = json.loads((d / "config.json").read_text())
        config = dict(config or {})
        if "text_config" in config:
            config = {**config, **config["text_config"]}

        def tok_id(key: str) -> Optional[int]:
            t = tcfg.get(key)
            if isinstance(t, dict):
                t = t.get("content")
            if isinstance(t, str):
                i = backend.token_to_id(t)
                if i is not None:
                    return i
            v = config.get(f"{key}_id")
            if isinstance(v, list):
                v = v[0] if v else None
            return v

        bos = tok_id("bos_token")
        if "bos_token" in tcfg and tcfg["bos_token"] is None:
            bos = None  # e.g. Qwen: no BOS token at all
        eos = tok_id("eos_token")
        pad = tok_id("pad_token")
        add_bos = tcfg.get("add_bos_token", bos is not None)
        return cls(backend, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=bool(add_bos))


# ------------------------------------------------------------------------------------------------
# GGUF metadata -> tokenizers


def _generate_merges(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens of the vocabulary, best-scoring result first
    (ties: longer left piece first) -- what transformers' `generate_merges` recovers."""
    merges = []
    for piece, score in scores.items():
        local = []
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_gguf_added_tokens(tk: HFTokenizer, tokens: Sequence[str], types: Sequence[int], vocab, byte_level=False):
    """Control tokens (type 3) become special added tokens; user-defined ones (type 4) plain added
    tokens matched whole in the text."""
    spelled = set(_bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == 3 and (spelled is None or set(t) <= spelled)
    ]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    if user:
        tk.add_tokens(user)


def gemma_tokenizer_from_gguf(meta: Mapping[str, Any]) -> HFTokenizer:
    """Gemma's SentencePiece BPE (byte fallback, no prefix space, spaces as '▁')."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    # Runs of spaces are stored as real spaces; the vocabulary spells them with '▁'.
    respelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(respelled)}
    order = {t: -i for i, t in enumerate(respelled)}  # Gemma's merge order is the file order
    merges = _generate_merges(vocab, order)
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 3)]
    tk = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_gguf_added_tokens(tk, tokens, types, vocab)
    return tk


def spm_tokenizer_from_gguf(meta: Mapping[str, Any]) -> HFTokenizer:
    """Llama-2-style SentencePiece BPE ('▁' prefix, byte fallback), merges ranked by score."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _generate_merges(vocab, dict(zip(tokens, scores)))
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
    tk = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    seq = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        seq.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(seq)
    _add_gguf_added_tokens(tk, tokens, types, vocab)
    return tk


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def byte_level_tokenizer_from_gguf(meta: Mapping[str, Any]) -> HFTokenizer:
    """Byte-level BPE (GPT-2 / Llama 3 / SmolLM2 / Qwen2) with the file's merges."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    raw = meta.get("tokenizer.ggml.merges")
    if raw is None:
        raise ValueError("byte-level GGUF tokenizer without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in raw]
    tk = HFTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""), GPT2_SPLIT)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(tk, tokens, types, vocab, byte_level=True)
    return tk


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """Build a `Tokenizer` from GGUF key/value metadata (`tokenizer.ggml.*`)."""
    kind = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture", "")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    if kind == "llama" and arch.startswith("gemma"):
        backend = gemma_tokenizer_from_gguf(meta)
    elif kind == "llama":
        backend = spm_tokenizer_from_gguf(meta)
    elif kind == "gpt2":
        backend = byte_level_tokenizer_from_gguf(meta)
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: llama, gpt2)")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        backend,
        bos_id=bos,
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(add_bos),
    )

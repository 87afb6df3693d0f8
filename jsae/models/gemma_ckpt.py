"""Checkpoints of Google DeepMind's `gemma` library (Orbax directories) <-> jsae params.

The library's param tree (`gm.nn.Gemma3_270M().init(...)["params"]`; shapes with N heads, K kv heads,
H head_dim, D d_model, F d_mlp):

    embedder.input_embedding            [V, D]
    layer_{i}.pre_attention_norm.scale  [D]   (post_attention_norm, pre_ffw_norm, post_ffw_norm)
    layer_{i}.attn.q_einsum.w           [N, D, H]     (N == K: attn.qkv_einsum.w [3, N, D, H])
    layer_{i}.attn.kv_einsum.w          [2, K, D, H]
    layer_{i}.attn.attn_vec_einsum.w    [N, H, D]
    layer_{i}.attn._query_norm.scale    [H]   (_key_norm; Gemma 3)
    layer_{i}.mlp.gating_einsum         [2, F, D]     (gate, up; Gemma 1's older layout: [2, D, F])
    layer_{i}.mlp.linear                [F, D]
    final_norm.scale                    [D]

Norm scales there are offsets (the norm multiplies by `1 + scale`); jsae stores multipliers. The
library saves this tree as is (`gm.ckpts.save_params`: nested); Kaggle's checkpoints hold the older
flat form (`"transformer/layer_0/attn/q_einsum": {"w": ...}`, `.../mlp/linear": {"w": ...}`). Both
are read; `save` writes the nested form. The architecture constants that no weight carries (sliding
window, local/global pattern, RoPE bases, soft-caps, query scaling) are those of the library's
Gemma 1/2/3 configs, told apart by the weights (QK-norm: Gemma 3; sandwich norms: Gemma 2).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np

from jsae.models.config import TransformerConfig
from jsae.models.convert import WeightError

ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
_NORMS = {"ln1": "pre_attention_norm", "ln1_post": "post_attention_norm", "ln2": "pre_ffw_norm",
          "ln2_post": "post_ffw_norm"}


def is_orbax_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in ORBAX_MARKERS)


# ---- tree layout ----


def _nested(tree: Mapping) -> dict:
    """The library's nested params from any of its saved forms (nested, {"params": ...}, flat)."""
    if "params" in tree and "embedder" not in tree:
        tree = tree["params"]
    if not any(str(k).startswith("transformer/") for k in tree):
        return dict(tree)
    out: dict = {}
    for k, leaf in tree.items():
        if not k.startswith("transformer/"):
            continue  # the vision tower of multimodal checkpoints
        parts = k[len("transformer/"):].split("/")
        if parts[-1] in ("linear", "gating_einsum") and isinstance(leaf, Mapping) and set(leaf) == {"w"}:
            leaf = leaf["w"]  # flat checkpoints keep these two under "w"
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def config_from_tree(tree: Mapping) -> TransformerConfig:
    """A TransformerConfig for a library param tree (Gemma 1, 2 or 3; sizes from the shapes)."""
    t = _nested(tree)
    try:
        V, D = t["embedder"]["input_embedding"].shape
        L = sum(1 for k in t if k.startswith("layer_"))
        a0, m0 = t["layer_0"]["attn"], t["layer_0"]["mlp"]
        if "qkv_einsum" in a0:
            _, N, _, H = a0["qkv_einsum"]["w"].shape
            K = N
        else:
            N, _, H = a0["q_einsum"]["w"].shape
            K = a0["kv_einsum"]["w"].shape[1]
        g = m0["gating_einsum"].shape
        F = g[1] if g[2] == D else g[2]
    except KeyError as e:
        raise WeightError(f"gemma checkpoint: missing {e.args[0]!r} (expected the gemma library's param tree)") from e
    qk = "_query_norm" in a0
    post = "post_attention_norm" in t["layer_0"]
    common = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K, head_dim=H, d_mlp=F,
                  act="gelu_tanh", mlp="glu", embed_scale=float(D) ** 0.5, tie_embeddings=True,
                  bos_id=2, eos_id=1, pad_id=0)
    if qk:  # Gemma 3: five sliding-window layers then one global; 27B scales queries by D/N
        big = D >= 2560
        return TransformerConfig(
            arch="gemma3", **common, max_position=32768 if not big else 131072, rope_base=1e6,
            rope_local_base=1e4, rope_scaling=(("factor", 8.0), ("rope_type", "linear")) if big else (),
            sliding_window=1024 if big else 512,
            layer_types=tuple("global" if i % 6 == 5 else "local" for i in range(L)),
            attn_scale=(D / N) ** -0.5 if D == 5376 else H**-0.5, qk_norm=True, post_norms=True)
    if post:  # Gemma 2: local and global layers alternate
        return TransformerConfig(
            arch="gemma2", **common, rope_base=1e4, sliding_window=4096,
            layer_types=tuple("local" if i % 2 == 0 else "global" for i in range(L)),
            attn_scale=(D / N) ** -0.5 if D == 4608 else H**-0.5, post_norms=True,
            attn_softcap=50.0, final_softcap=30.0)
    return TransformerConfig(arch="gemma", **common, rope_base=1e4)


def params_from_tree(cfg: TransformerConfig, tree: Mapping, source: str = "gemma checkpoint") -> dict:
    """Library params -> jsae params (NumPy float32; views where the layouts agree)."""
    t = _nested(tree)

    def f32(a):
        return np.asarray(a, dtype=np.float32)

    def get(node, *keys):
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                raise WeightError(f"{source}: missing {'.'.join(keys)}")
            node = node[k]
        return f32(node)

    blocks = []
    for i in range(cfg.n_layers):
        lay = t.get(f"layer_{i}")
        if lay is None:
            raise WeightError(f"{source}: missing layer_{i} (the config has {cfg.n_layers} layers)")
        at = lay["attn"]
        if "qkv_einsum" in at:
            w = get(at, "qkv_einsum", "w")
            q, k, v = w[0], w[1], w[2]
        else:
            q = get(at, "q_einsum", "w")
            kv = get(at, "kv_einsum", "w")
            k, v = kv[0], kv[1]
        attn = {"q": q.transpose(1, 0, 2), "k": k.transpose(1, 0, 2), "v": v.transpose(1, 0, 2),
                "o": get(at, "attn_vec_einsum", "w")}
        if cfg.qk_norm:
            attn["q_norm"] = 1.0 + get(at, "_query_norm", "scale")
            attn["k_norm"] = 1.0 + get(at, "_key_norm", "scale")
        g = get(lay, "mlp", "gating_einsum")
        if g.shape[1:] == (cfg.d_mlp, cfg.d_model):
            gate, up = g[0].T, g[1].T
        else:
            gate, up = g[0], g[1]
        b = {"attn": attn, "mlp": {"gate": gate, "up": up, "down": get(lay, "mlp", "linear")}}
        for ours, theirs in _NORMS.items():
            if ours in ("ln1_post", "ln2_post") and not cfg.post_norms:
                continue
            b[ours] = {"scale": 1.0 + get(lay, theirs, "scale")}
        blocks.append(b)
    return {"embed": get(t, "embedder", "input_embedding"), "blocks": blocks,
            "final_norm": {"scale": 1.0 + get(t, "final_norm", "scale")}}


def params_to_tree(cfg: TransformerConfig, params: Mapping) -> dict:
    """jsae params -> the library's nested param tree (NumPy float32; Gemma 2/3 gating layout)."""
    if cfg.arch not in ("gemma", "gemma2", "gemma3"):
        raise ValueError(f"only Gemma models have a gemma-library layout; this one is {cfg.arch!r}")

    def a(x):
        return np.asarray(x, dtype=np.float32)

    t: dict = {"embedder": {"input_embedding": a(params["embed"])},
               "final_norm": {"scale": a(params["final_norm"]["scale"]) - 1.0}}
    for i, b in enumerate(params["blocks"]):
        at = b["attn"]
        q, k, v = (a(at[n]).transpose(1, 0, 2) for n in ("q", "k", "v"))
        attn: dict = {"attn_vec_einsum": {"w": a(at["o"])}}
        if cfg.n_kv_heads == cfg.n_heads:
            attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
        else:
            attn["q_einsum"] = {"w": q}
            attn["kv_einsum"] = {"w": np.stack([k, v])}
        if cfg.qk_norm:
            attn["_query_norm"] = {"scale": a(at["q_norm"]) - 1.0}
            attn["_key_norm"] = {"scale": a(at["k_norm"]) - 1.0}
        m = b["mlp"]
        lay = {"attn": attn, "mlp": {"gating_einsum": np.stack([a(m["gate"]).T, a(m["up"]).T]),
                                     "linear": a(m["down"])}}
        for ours, theirs in _NORMS.items():
            if ours in b:
                lay[theirs] = {"scale": a(b[ours]["scale"]) - 1.0}
        t[f"layer_{i}"] = lay
    return t


# ---- Orbax ----


def _numpy_restore_args(meta):
    import jax
    import orbax.checkpoint as ocp

    return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)


def read_tree(path: str | os.PathLike) -> dict:
    """The param tree stored in an Orbax directory, as NumPy arrays (host memory only)."""
    import orbax.checkpoint as ocp

    p = Path(path).expanduser().resolve()
    if not is_orbax_dir(p):
        raise FileNotFoundError(f"{p}: not an Orbax checkpoint directory (none of {', '.join(ORBAX_MARKERS)})")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(p)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        return ckptr.restore(p, restore_args=_numpy_restore_args(meta))


def save(path: str | os.PathLike, cfg: TransformerConfig, params: Mapping) -> Path:
    """Write `params` as a gemma-library checkpoint (what `gm.ckpts.save_params` writes) at `path`."""
    import orbax.checkpoint as ocp

    p = Path(path).expanduser().resolve()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(p, params_to_tree(cfg, params))
        ckptr.wait_until_finished()
    return p


def load(path: str | os.PathLike, dtype: str = "float32", *, cfg: Optional[TransformerConfig] = None,
         name: Optional[str] = None):
    """A gemma-library Orbax checkpoint -> `LanguageModel`. The config comes from the weights unless
    given; the tokenizer from a `tokenizer.json` saved in the folder by `export`, if there is one."""
    from jsae.models.convert import to_device
    from jsae.models.loading import LanguageModel
    from jsae.models.tokenizer import Tokenizer

    p = Path(path).expanduser().resolve()
    tree = read_tree(p)
    cfg = cfg or config_from_tree(tree)
    params_np = params_from_tree(cfg, tree, source=str(p))
    del tree
    tok = Tokenizer.from_dir(p) if (p / "tokenizer.json").exists() else None
    return LanguageModel(cfg, to_device(params_np, dtype, consume=True), tok, name or p.name)


def export(lm, path: str | os.PathLike) -> Path:
    """Save a loaded Gemma `LanguageModel` as a gemma-library checkpoint (+ its tokenizer files)."""
    p = save(path, lm.cfg, lm.params)
    if lm.tokenizer is not None:
        lm.tokenizer.save(p)
    return p

"""Build an atlas: the streaming pass, logit effects, neighbourhoods, labels and maps, into one
:class:`~jsae.analysis.atlas.types.AtlasData`; save and load it.

    >>> from jsae.analysis.atlas import atlas
    >>> data = atlas("runs/quickstart", tokens=200_000)              # or atlas((model, sae, hook))
    >>> data.labels[data.row(1838)], data.cos_ids[data.row(1838)]
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jsae.analysis.atlas.state import StreamConfig, StreamResult
from jsae.analysis.atlas.types import AtlasData, AtlasError, LocalMap
from jsae.analysis.logits import feature_directions
from jsae.fileio import atomic_file

LOGIT_METHOD = (
    "W_dec[f] / norm_scale (a crosscoder's row at its last hook), times the final norm's elementwise scale, @ W_U (the final RMSNorm's "
    "weight folded into the unembedding as TransformerLens/SAELens fold_ln do; its division by "
    "the RMS is left out, so effects rank tokens but are not calibrated logits); ranked among "
    "the token ids seen in the atlas corpus"
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@partial(jax.jit, static_argnames=("k",))
def _topk_logits(dirs, scale, W_v, *, k):
    logits = jnp.einsum("fd,vd->fv", dirs * scale, W_v, preferred_element_type=jnp.float32)
    tv, ti = jax.lax.top_k(logits, k)
    bv, bi = jax.lax.top_k(-logits, k)
    return tv, ti, -bv, bi


@partial(jax.jit, static_argnames=("bins",))
def _logit_hist(dirs, scale, E, *, bins):
    """Per row of ``dirs [n, d]``: histogram of its logits over all of ``E [V, d]`` in ``bins``
    equal bins from min to max: ``(counts [n, bins], centres [n, bins])``."""
    logits = jnp.einsum("fd,vd->fv", dirs * scale, E, preferred_element_type=jnp.float32)
    lo, hi = logits.min(1, keepdims=True), logits.max(1, keepdims=True)
    width = jnp.maximum(hi - lo, 1e-12) / bins
    b = jnp.clip(jnp.floor((logits - lo) / width).astype(jnp.int32), 0, bins - 1)
    counts = jax.vmap(lambda r: jnp.bincount(r, length=bins))(b)
    return counts, lo + width * (jnp.arange(bins) + 0.5)


def logit_table(model, sae, vocab: np.ndarray, k: int = 10, chunk: int = 1024):
    """``(top_ids, top_vals, bottom_ids, bottom_vals)`` ``[d_sae, k]`` of every feature's
    decoder direction, among the token ids ``vocab`` (see ``LOGIT_METHOD``). Only the
    unembedding rows of ``vocab`` are used, so a 262k vocabulary costs nothing extra."""
    p = model.params
    vocab = np.unique(np.asarray(vocab, np.int64))
    k = int(min(k, len(vocab)))
    E = p["embed"] if model.cfg.tie_embeddings else jnp.transpose(p["unembed"])
    W_v = jnp.asarray(E)[jnp.asarray(vocab, jnp.int32)].astype(jnp.float32)  # [V', d]
    scale = jnp.asarray(p["final_norm"]["scale"], jnp.float32)
    F = sae.spec.d_sae
    outs = [[], [], [], []]
    for s in range(0, F, chunk):
        dirs = feature_directions(sae, np.arange(s, min(s + chunk, F))).astype(jnp.float32)
        if dirs.shape[0] < chunk and F > chunk:
            dirs = jnp.pad(dirs, ((0, chunk - dirs.shape[0]), (0, 0)))
        res = _topk_logits(dirs, scale, W_v, k=k)
        n = min(chunk, F - s)
        for o, r in zip(outs, res):
            o.append(np.asarray(r)[:n])
    tv, ti, bv, bi = (np.concatenate(o) for o in outs)
    return vocab[ti].astype(np.int32), tv.astype(np.float32), vocab[bi].astype(np.int32), bv.astype(np.float32)


def _corpus(model, tokens: int, context_length: int, seed: int, texts=None):
    from jsae.analysis.corpus import corpus_contexts, pack_texts

    n_ctx = max(1, -(-int(tokens) // int(context_length)))
    if texts is not None:
        tok, msk = pack_texts(model.tokenizer, list(texts), context_length)
        return tok[:n_ctx], msk[:n_ctx]
    return corpus_contexts(model.tokenizer, n_ctx, context_length, seed=seed,
                           sotu=tokens > 800_000)  # wiki summaries hold ~1.1M tokens


def _resolve(source, hook, model):
    """(model, sae, hook, run path or None, model name)."""
    if isinstance(source, (tuple, list)):
        m, sae, h = source
        return m, sae, h, None, str(getattr(m, "name", ""))
    from jsae.analysis.run import load_run

    r = load_run(source, hook, model=model)
    return r.model, r.sae, r.hook, r.path, r.model_name


def from_stream(res: StreamResult, sae, model, *, hook: str, n_logits: int = 10,
                n_neighbours: int = 10, maps: bool = True, seed: int = 0, vocab=None,
                meta: dict | None = None, progress: bool = True, map_method: str = "umap"
                ) -> AtlasData:
    """An :class:`AtlasData` of every feature from a finished pass."""
    from jsae.analysis.atlas.labels import auto_labels, token_strings
    from jsae.analysis.atlas.maps import global_map
    from jsae.analysis.atlas.neighbours import (
        COACT_SCORE,
        coactivation_from_pass,
        decoder_neighbours,
        decoder_rows,
    )

    s, cfg = res.state, res.cfg
    F = sae.spec.d_sae
    live = s.fires > 0
    W = decoder_rows(sae)
    log = _log if progress else (lambda m: None)
    log(f"atlas: {int(live.sum())} of {F} features fired on {res.n_tokens:,} tokens; "
        "logit effects, neighbours ...")
    if vocab is None:
        vocab = np.unique(s.top_tok[s.top_tok >= 0])
    tok = getattr(model, "tokenizer", None)
    specials = {getattr(tok, n, None) for n in ("bos_id", "eos_id", "pad_id")} - {None}
    vocab = np.setdiff1d(np.asarray(vocab), list(specials))
    lt_i, lt_v, lb_i, lb_v = logit_table(model, sae, vocab, n_logits)
    cos_i, cos_v = decoder_neighbours(W, n_neighbours, candidates=live if live.any() else None,
                                      progress=progress)
    co_i, co_v = coactivation_from_pass(s, n_neighbours)
    ids_used = np.concatenate([s.top_tok.ravel(), s.band_tok.ravel(), lt_i.ravel(), lb_i.ravel()])
    token_str = token_strings(tok, ids_used) if tok is not None else {}
    L = cfg.left_
    anchor_top = np.full(s.top_val.shape, L, np.int32)
    labels = auto_labels(s.top_tok, anchor_top, s.top_val, token_str)
    if maps and live.sum() >= 2:
        log(f"atlas: {map_method.upper()} map of {int(live.sum())} decoder directions ...")
        xy, cl, cl_labels = global_map(W, live, labels, seed=seed, method=map_method)
    else:
        xy, cl, cl_labels = np.full((F, 2), np.nan, np.float32), np.full(F, -1, np.int64), {}
    m = {
        "hook": hook, "model": str(getattr(model, "name", "")), "d_sae": int(F),
        "d_in": int(sae.spec.d_in), "architecture": sae.spec.architecture,
        "n_tokens": int(res.n_tokens), "n_contexts": int(res.n_contexts),
        "context_length": int(res.context_length), "source": "text", "logit_method": LOGIT_METHOD,
        "coact_score": f"{COACT_SCORE}: |f & g| / |f | g| over the tokens on which each is "
                       f"active (among a token's {s.coact.shape[1]} largest codes), all "
                       f"{res.n_tokens:,} tokens of the pass, for each feature's "
                       f"{s.coact_cand.shape[1]} most frequent partners among the first "
                       f"{len(res.coact_rows()):,} tokens",
        "band_method": "10 equal-width bands over [0, 2^e) with 2^(e-1) <= max < 2^e; per band "
                       "the tokens of lowest hash priority (uniform, deterministic)".replace(
                           "10", str(cfg.bands)),
        "top_k": cfg.top_k, "window": cfg.window, "bands": cfg.bands,
        "band_samples": cfg.band_samples, "n_live": int(live.sum()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from jsae.sae.archs import get_arch

    profile = get_arch(sae.spec.architecture).layer_profile(sae)  # where each feature writes
    if profile is not None:
        from jsae.runs import input_hooks

        profile = profile.astype(np.float32)
        m["layer_hooks"] = input_hooks(hook)
    m.update(meta or {})
    return AtlasData(
        meta=m, feature_ids=np.arange(F, dtype=np.int64), density=res.density,
        mean_act=res.mean_act, max_act=s.max.astype(np.float32),
        hist_edges=cfg.hist_edges(), hist_counts=s.hist.astype(np.int64),
        top_value=s.top_val.astype(np.float32), top_tokens=s.top_tok.astype(np.int32),
        top_acts=s.top_act.astype(np.float16), top_anchor=anchor_top,
        band_edges=res.band_edges, band_value=s.band_val.astype(np.float32),
        band_tokens=s.band_tok.astype(np.int32), band_acts=s.band_act.astype(np.float16),
        band_anchor=np.full(s.band_val.shape, L, np.int32),
        band_count=s.band_count.astype(np.int64),
        logit_top_ids=lt_i, logit_top_vals=lt_v, logit_bottom_ids=lb_i, logit_bottom_vals=lb_v,
        cos_ids=cos_i, cos_vals=cos_v, coact_ids=co_i, coact_vals=co_v,
        map_xy=xy, cluster=cl, cluster_labels=cl_labels, labels=labels, token_str=token_str,
        layer_profile=profile,
    )


def contexts(model, tokens: int, context_length: int, seed: int, texts=None, cache=None,
             cfg: StreamConfig = StreamConfig()):
    """``(tokens [N, T], mask [N, T])`` of the pass: the offline corpus (or ``texts``) packed
    into ``context_length`` contexts, or a ``jsae harvest`` cache's stored contexts (whole
    contexts up to ``tokens``); at least ``cfg.top_k`` of them."""
    if cache is not None:
        from jsae.data.cache import read_contexts

        tok, msk = read_contexts(cache)
        n_ctx = int(np.searchsorted(np.cumsum(msk.sum(1)), int(tokens))) + 1
        tok, msk = tok[:n_ctx], msk[:n_ctx]
        context_length = tok.shape[1]
    else:
        tok, msk = _corpus(model, tokens, context_length, seed, texts)
    if len(tok) < cfg.top_k:
        raise AtlasError(f"the corpus gave {len(tok)} contexts of {context_length} tokens, fewer "
                         f"than the top-k ({cfg.top_k}): raise --tokens or lower --top-k")
    return tok, msk


def stream_pass(model, saes: dict, tok, msk, cfg: StreamConfig, *, cache=None, batch_size=32,
                state_dir=None, mesh=None, progress=True, forward=None) -> dict[str, StreamResult]:
    """The streaming pass of every dictionary in ``saes`` (key -> SAE) over the contexts, one
    LM forward per batch (or reading ``cache``'s activations)."""
    from jsae.analysis.atlas.stream import stream_cache, stream_text

    if cache is not None:
        return stream_cache(saes, cache, cfg, batch_size=batch_size, max_contexts=len(tok),
                            state_dir=state_dir, mesh=mesh, progress=progress)
    return stream_text(model, saes, tok, msk, cfg, batch_size=batch_size, state_dir=state_dir,
                       mesh=mesh, progress=progress, forward=forward)


def atlas(source, *, hook: str | None = None, tokens: int = 200_000, context_length: int = 128,
          cfg: StreamConfig = StreamConfig(), batch_size: int = 32, n_logits: int = 10,
          n_neighbours: int = 10, maps: bool = True, around=(), radius: float = 0.3,
          seed: int = 0, state_dir: str | Path | None = None, mesh=None, progress: bool = True,
          model=None, texts=None, forward=None, map_method: str = "umap",
          cache=None) -> AtlasData:
    """The atlas of a dictionary over ``tokens`` tokens of text.

    ``source``: a run folder (``jsae train`` output; ``hook`` picks the SAE) or a tuple
    ``(model, sae, hook)``. The text is the offline corpus (``texts``: your documents), packed
    into ``context_length`` contexts; ``state_dir`` makes the pass resumable; ``mesh`` shards
    latents over ``mesh.model``; ``around``: feature ids whose local maps (``radius``: cosine
    distance) are added; ``map_method``: "umap" (default) or "pca" (no numba compile).
    ``cache``: a ``jsae harvest`` folder: the pass reads its held-out activations and stored
    contexts (at most ``tokens`` of them, in whole contexts) instead of running the LM; the
    model is then used only for the tokenizer and the logit effects."""
    model, sae, hook, run_path, model_name = _resolve(source, hook, model)
    F = sae.spec.d_sae
    for c in around:
        if not 0 <= int(c) < F:
            raise AtlasError(f"feature {c} is out of range: the dictionary has {F} features (0..{F - 1})")
    tok, msk = contexts(model, tokens, context_length, seed, texts, cache, cfg)
    context_length = tok.shape[1]
    if progress:
        _log(f"atlas: {F} features at {hook}, {len(tok)} contexts x {context_length} tokens "
             f"({int(msk.sum()):,} counted)")
    res = stream_pass(model, {hook: sae}, tok, msk, cfg, cache=cache, batch_size=batch_size,
                      state_dir=state_dir, mesh=mesh, progress=progress, forward=forward)[hook]
    meta = {"run": str(run_path) if run_path else "", "model": model_name,
            "source": f"cache {cache}" if cache is not None else "text"}
    data = from_stream(res, sae, model, hook=hook, n_logits=n_logits, n_neighbours=n_neighbours,
                       maps=maps, seed=seed, meta=meta, progress=progress, map_method=map_method)
    data.meta["map_method"] = map_method
    for c in around:
        add_local_map(data, sae, int(c), radius, seed=seed, method=map_method)
    return data


def add_local_map(data: AtlasData, sae, center: int, radius: float, *, seed: int = 0,
                  method: str = "umap") -> LocalMap:
    """Compute the local map around ``center`` and put it in ``data.local_maps`` (replacing
    an older one of the same center)."""
    from jsae.analysis.atlas.maps import local_map

    lm = local_map(sae, center, radius, data=data, seed=seed, method=method)
    data.local_maps = [m for m in data.local_maps if m.center != lm.center] + [lm]
    return lm


# ---- save / load ----------------------------------------------------------------------------
_JSON_FIELDS = ("meta", "cluster_labels", "labels", "token_str", "explanations")


def save_atlas(data: AtlasData, path: str | Path) -> Path:
    """``path`` (``.npz``): the arrays, plus the tables and local maps as JSON inside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, tables = {}, {}
    for f in dataclasses.fields(data):
        v = getattr(data, f.name)
        if f.name == "local_maps":
            tables["local_maps"] = [
                {"center": m.center, "radius": m.radius, "ids": np.asarray(m.ids).tolist(),
                 "xy": np.asarray(m.xy, np.float64).tolist(), "cluster": np.asarray(m.cluster).tolist(),
                 "cluster_labels": {str(k): s for k, s in m.cluster_labels.items()}} for m in v]
        elif f.name in _JSON_FIELDS:
            if isinstance(v, dict):
                v = {str(k): x for k, x in v.items()}
            tables[f.name] = v
        elif v is not None:
            arrays[f.name] = np.asarray(v)
    blob = json.dumps(tables, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no .npz
        np.savez(f, __tables__=np.frombuffer(blob, np.uint8), **arrays)
    return path


def load_atlas(path: str | Path) -> AtlasData:
    from jsae.errors import FileFormatError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no atlas at {path} (build one first: jsae atlas RUN --out DIR)")
    try:
        with np.load(path) as d:
            tables = json.loads(bytes(d["__tables__"]).decode("utf-8", "surrogatepass"))
            arrays = {k: d[k] for k in d.files if k != "__tables__"}
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError,
            zipfile.BadZipFile) as e:  # not an .npz, truncated, pickled, no tables
        raise FileFormatError(f"{path} is not a readable atlas file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from e
    try:
        data = _atlas_from(arrays, tables, path)
        from jsae.analysis.atlas.site import check_atlas

        check_atlas(data)
    except FileFormatError as e:
        msg = str(e)
        raise FileFormatError(msg.replace("atlas data:", f"{path}:", 1) if msg.startswith(
            "atlas data:") else msg) from e
    except (IndexError, TypeError, ValueError, AttributeError) as e:  # a field of the wrong rank
        raise FileFormatError(f"{path}: not a consistent atlas file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); rebuild it (--rebuild)") from e
    return data


def _atlas_from(arrays: dict, tables, path: Path) -> AtlasData:
    """AtlasData from the arrays and JSON tables of an atlas file, each field's type checked."""
    from jsae import validate as v
    from jsae.errors import FileFormatError

    tables = v.mapping(tables, "the tables", path)
    for key in ("meta", "cluster_labels", "token_str"):
        v.field(tables, key, dict, path)
    v.field(tables, "labels", list, path)
    v.field(tables, "explanations", (list, None), path, default=None)
    v.field(tables, "local_maps", list, path, default=[])
    names = {f.name for f in dataclasses.fields(AtlasData)} - set(_JSON_FIELDS) - {"local_maps"}
    unknown = sorted(set(arrays) - names)
    if unknown:
        raise v.bad(path, "", f"holds unknown arrays {unknown}: not a jsae atlas file")
    required = {f.name for f in dataclasses.fields(AtlasData)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(_JSON_FIELDS) - set(arrays))
    if missing:
        raise v.bad(path, "", f"lacks the arrays {missing}: not a complete atlas file")
    for k, a in arrays.items():
        if a.dtype.kind not in "fiub":
            raise v.bad(path, f"array {k!r}", f"holds {a.dtype} values; expected numbers")
    kw = dict(arrays)
    kw["meta"] = tables["meta"]
    try:
        kw["cluster_labels"] = {int(k): str(x) for k, x in tables["cluster_labels"].items()}
        kw["token_str"] = {int(k): str(x) for k, x in tables["token_str"].items()}
    except ValueError as e:
        raise v.bad(path, "a table", f"has a key that is not an integer id ({e})") from e
    kw["labels"] = [str(x) for x in tables["labels"]]
    kw["explanations"] = tables.get("explanations")
    maps = []
    for i, m in enumerate(tables.get("local_maps") or []):
        m = v.mapping(m, f"local_maps[{i}]", path)
        try:
            maps.append(LocalMap(
                int(v.field(m, "center", int, path, prefix=f"local_maps[{i}].")),
                float(v.field(m, "radius", float, path, prefix=f"local_maps[{i}].")),
                np.asarray(m["ids"], np.int64), np.asarray(m["xy"], np.float32).reshape(-1, 2),
                np.asarray(m["cluster"], np.int64),
                {int(k): str(x) for k, x in v.mapping(m["cluster_labels"],
                                                     f"local_maps[{i}].cluster_labels", path).items()}))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, FileFormatError):
                raise
            raise v.bad(path, f"local_maps[{i}]", f"is damaged ({type(e).__name__}: {e})") from e
    kw["local_maps"] = maps
    data = AtlasData(**kw)
    F = len(data.feature_ids)
    if np.shape(data.feature_ids) != (F,) or data.meta.get("d_sae") is not None and (
            (data.feature_ids < 0).any() or (data.feature_ids >= data.meta["d_sae"]).any()):
        raise v.bad(path, "array 'feature_ids'", "holds ids outside 0..d_sae-1 (meta.d_sae "
                    f"{data.meta.get('d_sae')!r})")
    return data

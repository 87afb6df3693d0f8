"""Activation cache on disk: harvest once, train many SAEs (``data.source: cache``).

Layout (any ``etils.epath`` path: local, ``gs://`` ...)::

    DIR/manifest.json
    DIR/train/shard-000000.safetensors   {hook: [rows, d_in]} (rows aligned across hooks)
    DIR/eval/shard-000000.safetensors    held-out documents' tokens, in corpus order
    DIR/eval/contexts.safetensors        {tokens: int32 [N, T], rows: uint8 [N, T]}: the
                                         held-out contexts and which positions are rows

``manifest.json`` records the model, hooks, d_in, dtype, context length, the text source and
its settings, token counts, the shard list, per-hook normalisation statistics (mean squared
norm, mean norm, mean vector, and ``norm_scale = sqrt(d_in / E||x||^2)``), and the data
position to resume harvesting from.

Writes are atomic per shard: a shard goes to a temporary name and is renamed, and only then
is the manifest (itself written tmp + rename) updated to list it. An interrupted harvest
restarts after its last listed shard, restores the text source's saved position, and so
writes exactly the shards an uninterrupted harvest would have written.

Training rows are written already mixed (they pass through the shuffle buffer of the text
source); reading permutes the shard order per epoch (seeded), gives each process every
P-th shard, and mixes across shards again with a :class:`~jsae.data.shuffle.ShuffleMixer`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jsae.data.shuffle import ShuffleMixer
from jsae.errors import BadInput, FileFormatError, OutputRefused
from jsae.fileio import write_bytes

FORMAT = "jsae-activation-cache"
VERSION = 1
DEFAULT_SHARD_ROWS = 32768


def _path(p):
    from etils import epath

    s = str(p)
    return epath.Path(os.path.expanduser(s) if "://" not in s else s)


def _atomic_write(path, data: bytes) -> None:
    write_bytes(_path(path), data)  # overwrites (a shard rewritten after a crash, the manifest)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def save_shard(path, rows: dict[str, np.ndarray], dtype: str = "float32") -> dict:
    """Write a shard atomically; returns its ``{"bytes", "sha256"}`` for the manifest."""
    from safetensors.numpy import save

    dt = _np_dtype(dtype)
    data = save({h: np.ascontiguousarray(v.astype(dt)) for h, v in rows.items()})
    _atomic_write(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class DamagedShardError(FileFormatError):
    """A cache shard whose size, checksum or layout is not what the harvest wrote."""


def _size(f) -> int:
    st = f.stat()  # pathlib's os.stat_result, or etils' StatResult (gs://)
    return int(getattr(st, "st_size", None) if hasattr(st, "st_size") else st.length)


def _damaged(path, why: str) -> DamagedShardError:
    cache = _path(path).parent.parent
    return DamagedShardError(
        f"activation cache shard {path} is damaged ({why}); the cache at {cache} must be "
        f"harvested again: `jsae harvest CONFIG --out {cache} --overwrite` (or move that "
        "folder aside and harvest into a new one)")


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def parse_safetensors(buf: bytes, hooks=None, *, where="shard") -> dict[str, np.ndarray]:
    """Decode safetensors bytes (F32/F16/BF16/F64) as float32 arrays (no copy of the rest)."""
    n = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
    if not 0 < n <= len(buf) - 8:
        raise _damaged(where, f"{len(buf)} bytes, no complete safetensors header")
    try:
        header = json.loads(buf[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(where, f"unreadable header: {e}") from e
    base = 8 + n
    if not isinstance(header, dict):
        raise _damaged(where, "its header is not a JSON object")
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in t["data_offsets"])
            size = _itemsize(t["dtype"])
            shape = [int(x) for x in t["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(where, f"tensor {name!r} has a bad header entry ({type(e).__name__}: "
                           f"{e})") from e
        if base + b > len(buf):
            raise _damaged(where, f"{len(buf)} bytes but tensor {name!r} ends at byte {base + b}")
        if not 0 <= a <= b or b - a != size * math.prod(shape) or min(shape, default=0) < 0:
            raise _damaged(where, f"tensor {name!r}: bytes {a}..{b} do not hold shape {shape} of "
                           f"{t['dtype']}")
    out = {}
    for name in hooks if hooks is not None else [k for k in header if k != "__metadata__"]:
        if name not in header or name == "__metadata__":
            raise _damaged(where, f"it has no tensor {name!r} (it has "
                           f"{', '.join(k for k in header if k != '__metadata__')})")
        t = header[name]
        a, b = t["data_offsets"]
        arr = np.frombuffer(
            buf, _np_dtype(_ST_DTYPES[t["dtype"]]), (b - a) // _itemsize(t["dtype"]), base + a
        )
        out[name] = arr.reshape(t["shape"]).astype(np.float32)
    return out


def _itemsize(st_dtype: str) -> int:
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    if st_dtype not in sizes:
        raise ValueError(f"dtype {st_dtype!r} (expected one of {', '.join(sizes)})")
    return sizes[st_dtype]


def load_shard(path, hooks=None, expect: dict | None = None) -> dict[str, np.ndarray]:
    """A shard as float32 arrays (all hooks, or the given ones).

    ``expect`` (the manifest's entry: ``bytes``, ``sha256``) is checked first: a truncated or
    altered shard is a :class:`DamagedShardError` naming the file and how to re-harvest.
    """
    buf = _path(path).read_bytes()
    if expect and expect.get("bytes") is not None and len(buf) != expect["bytes"]:
        raise _damaged(path, f"{len(buf):,} bytes, {expect['bytes']:,} were written")
    if expect and expect.get("sha256") and hashlib.sha256(buf).hexdigest() != expect["sha256"]:
        raise _damaged(path, "its SHA-256 differs from the one in the manifest")
    return parse_safetensors(buf, hooks, where=path)


def manifest_name(process_index: int = 0, process_count: int = 1) -> str:
    """``manifest.json`` for a single writer; ``manifest-00003-of-00008.json`` per process."""
    if process_count == 1:
        return "manifest.json"
    return f"manifest-{process_index:05d}-of-{process_count:05d}.json"


def _read_one(m) -> dict:
    from jsae.validate import read_json

    man = read_json(m, "jsae activation cache manifest")
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise FileFormatError(f"{m} is not a jsae activation cache manifest (expected "
                              f"\"format\": \"{FORMAT}\")")
    _check_manifest(man, m)
    return man


def _check_manifest(man: dict, m) -> None:
    """Every field a reader of the cache uses, typed and consistent with the others (hooks and
    d_in, shard rows and split totals, process index and count): a damaged or hand-edited
    manifest is refused in one line naming the field, not met later as a traceback."""
    from jsae import validate as v

    v.field(man, "version", int, m, choices=(VERSION,))
    hooks = v.field(man, "hooks", list, m)
    if not hooks or not all(isinstance(h, str) and h for h in hooks) or len(set(hooks)) != len(hooks):
        raise v.bad(m, "field 'hooks'", f"is {hooks!r:.80}; expected distinct hook names")
    d_in = v.mapping(v.field(man, "d_in", dict, m), "field 'd_in'", m)
    for h in hooks:
        v.field(d_in, h, int, m, prefix="d_in.", lo=1)
    P = v.field(man, "process_count", int, m, default=1, lo=1)
    v.field(man, "process_index", int, m, default=0, lo=0, hi=P - 1)
    if "dtype" in man:
        v.field(man, "dtype", str, m, choices=("float32", "float16", "bfloat16", "float64"))
    for key in ("context_length", "shard_rows"):
        if key in man:
            v.field(man, key, int, m, lo=1)
    splits = v.mapping(v.field(man, "splits", dict, m), "field 'splits'", m)
    for sp in ("train", "eval"):
        pre = f"splits.{sp}."
        s = v.mapping(v.field(splits, sp, dict, m, prefix="splits."), f"field 'splits.{sp}'", m)
        shards = v.field(s, "shards", list, m, prefix=pre)
        total = 0
        for i, sh in enumerate(shards):
            q = f"{pre}shards[{i}]."
            sh = v.mapping(sh, f"field {q[:-1]!r}", m)
            f = v.field(sh, "file", str, m, prefix=q)
            if not f.startswith(f"{sp}/") or ".." in f.split("/") or "\\" in f:
                raise v.bad(m, f"field '{q}file'", f"is {f!r:.80}; expected a file under {sp}/")
            total += v.field(sh, "rows", int, m, prefix=q, lo=0)
            v.field(sh, "bytes", (int, None), m, prefix=q, lo=0, default=None)
            v.field(sh, "sha256", (str, None), m, prefix=q, default=None)
        rows = v.field(s, "rows", int, m, prefix=pre, lo=0)
        if rows != total:
            raise v.bad(m, f"field '{pre}rows'", f"is {rows} but its shards hold {total} rows")
        v.field(s, "complete", bool, m, prefix=pre)
        c = s.get("contexts")
        if c is not None:
            c = v.mapping(c, f"field '{pre}contexts'", m)
            f = v.field(c, "file", str, m, prefix=f"{pre}contexts.")
            if not f.startswith(f"{sp}/") or ".." in f.split("/"):
                raise v.bad(m, f"field '{pre}contexts.file'", f"is {f!r:.80}; expected a file "
                            f"under {sp}/")
            v.field(c, "contexts", int, m, prefix=f"{pre}contexts.", lo=0)
            v.field(c, "bytes", int, m, prefix=f"{pre}contexts.", lo=0)
            v.field(c, "sha256", str, m, prefix=f"{pre}contexts.")
    if "tokens" in man and v.field(man, "tokens", int, m, lo=0) != splits["train"]["rows"]:
        raise v.bad(m, "field 'tokens'", f"is {man['tokens']} but splits.train holds "
                    f"{splits['train']['rows']} rows")
    stats = v.mapping(man.get("stats") or {}, "field 'stats'", m)
    acc = v.mapping(stats.get("_acc") or {}, "field 'stats._acc'", m)
    for h, a in acc.items():
        if h not in d_in:
            raise v.bad(m, f"field 'stats._acc.{h}'", "names a hook the cache does not hold")
        q = f"stats._acc.{h}."
        a = v.mapping(a, f"field {q[:-1]!r}", m)
        v.field(a, "count", int, m, prefix=q, lo=0)
        v.field(a, "sum_sq_norm", float, m, prefix=q, lo=0)
        v.field(a, "sum_norm", float, m, prefix=q, lo=0)
        v.number_list(a, "sum", m, n=d_in[h], prefix=q)
    for h, st in stats.items():
        if h == "_acc":
            continue
        if h not in d_in:
            raise v.bad(m, f"field 'stats.{h}'", "names a hook the cache does not hold")
        st = v.mapping(st, f"field 'stats.{h}'", m)
        if "norm_scale" in st:
            v.field(st, "norm_scale", float, m, prefix=f"stats.{h}.", lo=0, lo_open=True,
                    float32=True)
        if "mean" in st:
            v.number_list(st, "mean", m, n=d_in[h], prefix=f"stats.{h}.")


def read_manifest(path) -> dict:
    """The cache's manifest; a cache written by P processes (one manifest each) is merged:
    shards listed process after process, counts and statistics summed."""
    root = _path(path)
    if (root / "manifest.json").exists():
        return _read_one(root / "manifest.json")
    parts = sorted(root.glob("manifest-*-of-*.json")) if root.exists() else []
    if not parts:
        raise FileNotFoundError(f"no activation cache at {path} (missing manifest.json)")
    mans = [_read_one(m) for m in parts]
    P = mans[0].get("process_count", 1)
    have = sorted(m.get("process_index", 0) for m in mans)
    if have != list(range(P)) or any(m.get("process_count", 1) != P for m in mans):
        raise FileFormatError(f"{path}: manifests of processes {have} of {P}; some are missing "
                              "or disagree on the process count")
    for m, f in zip(mans[1:], parts[1:]):
        diff = [k for k in ("hooks", "d_in", "dtype", "context_length") if m.get(k) != mans[0].get(k)]
        if diff:
            raise FileFormatError(f"{f}: {', '.join(diff)} differ from {parts[0]}")
    merged = {k: v for k, v in mans[0].items() if k not in ("splits", "stats", "tokens")}
    merged["process_index"], merged["process_count"] = 0, 1
    merged["splits"] = {}
    for sp in ("train", "eval"):
        merged["splits"][sp] = {
            "shards": [s for m in mans for s in m["splits"][sp]["shards"]],
            "rows": sum(m["splits"][sp]["rows"] for m in mans),
            "complete": all(m["splits"][sp]["complete"] for m in mans),
            "resume": None,
        }
    stats = _Stats(merged["d_in"])
    for m in mans:
        for h, a in m.get("stats", {}).get("_acc", {}).items():
            acc = stats.acc[h]
            acc["count"] += a["count"]
            acc["sum_sq_norm"] += a["sum_sq_norm"]
            acc["sum_norm"] += a["sum_norm"]
            acc["sum"] = (np.asarray(acc["sum"]) + np.asarray(a["sum"])).tolist()
    merged["stats"] = stats.manifest_stats()
    merged["tokens"] = merged["splits"]["train"]["rows"]
    return merged


class _Stats:
    """Running per-hook statistics (float64 sums, resumable through the manifest)."""

    def __init__(self, d_in: dict[str, int], saved: dict | None = None):
        self.d_in = d_in
        self.acc = {
            h: {"count": 0, "sum_sq_norm": 0.0, "sum_norm": 0.0, "sum": [0.0] * d}
            for h, d in d_in.items()
        }
        if saved:
            for h, s in saved.items():
                if h in self.acc:
                    self.acc[h] = {k: s[k] for k in ("count", "sum_sq_norm", "sum_norm", "sum")}

    def update(self, rows: dict[str, np.ndarray]) -> None:
        for h, x in rows.items():
            x = np.asarray(x, np.float64)
            n = np.linalg.norm(x, axis=-1)
            a = self.acc[h]
            a["count"] += len(x)
            a["sum_sq_norm"] += float((n**2).sum())
            a["sum_norm"] += float(n.sum())
            a["sum"] = (np.asarray(a["sum"]) + x.sum(0)).tolist()

    def to_json(self) -> dict:
        out = {}
        for h, a in self.acc.items():
            c = max(a["count"], 1)
            msq = a["sum_sq_norm"] / c
            out[h] = dict(
                a,
                mean_sq_norm=msq,
                mean_norm=a["sum_norm"] / c,
                norm_scale=math.sqrt(self.d_in[h] / msq) if msq > 0 else 1.0,
                mean=(np.asarray(a["sum"]) / c).tolist(),
            )
        return out


def _manifest_stats(self) -> dict:
    stats = self.to_json()
    return {
        **{h: {k: v for k, v in st.items() if k != "sum"} for h, st in stats.items()},
        "_acc": {h: self.acc[h] for h in self.acc},
    }


_Stats.manifest_stats = _manifest_stats


class CacheWriter:
    """Writes shards and keeps ``manifest.json`` current after each one (resumable)."""

    def __init__(
        self,
        path,
        meta: dict,
        *,
        overwrite: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.path = _path(path)
        self.meta = meta
        self.name = manifest_name(process_index, process_count)
        self.prefix = "" if process_count == 1 else f"p{process_index:05d}-"
        if (self.path / self.name).exists() and not overwrite:
            man = _read_one(self.path / self.name)
            diff = [k for k in meta if k in man and man[k] != meta[k]]
            if diff:
                raise OutputRefused(
                    f"{self.path} holds a cache made with different settings ("
                    + ", ".join(f"{k}: {man[k]!r} vs {meta[k]!r}" for k in diff)
                    + "); choose another --out or delete it"
                )
            self.manifest = man
            self._check_shards()
        else:
            self.manifest = dict(
                format=FORMAT,
                version=VERSION,
                process_index=process_index,
                process_count=process_count,
                **meta,
                splits={
                    s: {"shards": [], "rows": 0, "complete": False, "resume": None}
                    for s in ("train", "eval")
                },
                stats={},
            )
        self.stats = _Stats(meta["d_in"], self.manifest.get("stats", {}).get("_acc"))
        self.path.mkdir(parents=True, exist_ok=True)

    def split(self, name: str) -> dict:
        return self.manifest["splits"][name]

    def _check_shards(self) -> None:
        """Before resuming: every shard the manifest lists is there, with its recorded size."""
        for sp in self.manifest["splits"].values():
            for sh in sp["shards"]:
                f = self.path / sh["file"]
                if not f.exists():
                    raise _damaged(f, "missing")
                size = _size(f)
                if sh.get("bytes") is not None and size != sh["bytes"]:
                    raise _damaged(f, f"{size:,} bytes, {sh['bytes']:,} were written")

    def write_shard(self, split: str, rows: dict[str, np.ndarray], resume: Any = None) -> None:
        sp = self.split(split)
        name = f"{split}/{self.prefix}shard-{len(sp['shards']):06d}.safetensors"
        n = len(next(iter(rows.values())))
        check = save_shard(self.path / name, rows, self.meta.get("dtype", "float32"))
        if split == "train":
            self.stats.update(rows)
        sp["shards"].append({"file": name, "rows": n, **check})
        sp["rows"] += n
        sp["resume"] = resume
        self._flush()

    def write_contexts(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        """Store the held-out contexts ``tokens [N, T]`` and ``rows [N, T]`` (positions that
        produced a row, row-major), cut to the held-out rows written, so the atlas can show
        every row's context without running the LM."""
        from safetensors.numpy import save

        rows = np.asarray(rows, bool)
        n = self.split("eval")["rows"]
        csum = np.cumsum(rows.reshape(-1))
        if csum[-1] < n:
            raise ValueError(f"held-out contexts hold {int(csum[-1])} rows, {n} were written")
        rows = (rows.reshape(-1) & (csum <= n)).reshape(rows.shape)
        keep = rows.any(1)
        last = int(np.nonzero(keep)[0][-1]) + 1 if keep.any() else 0
        tokens, rows = np.asarray(tokens, np.int32)[:last], rows[:last]
        data = save({"tokens": np.ascontiguousarray(tokens),
                     "rows": np.ascontiguousarray(rows.astype(np.uint8))})
        name = f"eval/{self.prefix}contexts.safetensors"
        _atomic_write(self.path / name, data)
        self.split("eval")["contexts"] = {
            "file": name, "contexts": int(last), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
        self._flush()

    def mark_complete(self, split: str) -> None:
        self.split(split)["complete"] = True
        self._flush()

    def _flush(self) -> None:
        self.manifest["stats"] = self.stats.manifest_stats()
        self.manifest["tokens"] = self.split("train")["rows"]
        _atomic_write(self.path / self.name, json.dumps(self.manifest, indent=1).encode())


def cache_meta(cfg, model_name: str, d_in: dict[str, int], shard_rows: int) -> dict:
    d = cfg.data
    return {
        "model": model_name,
        "hooks": list(cfg.model.hooks),
        "d_in": d_in,
        "dtype": cfg.model.dtype,
        "context_length": d.context_length,
        "shard_rows": shard_rows,
        "source": {
            "dataset": d.dataset,
            "path": d.path,
            "data_dir": d.data_dir,
            "split": d.split,
            "text_field": d.text_field,
            "seed": cfg.seed,
            "holdout_fraction": d.holdout_fraction,
            "prepend_bos": d.prepend_bos,
            "exclude_bos": d.exclude_bos,
            "exclude_norm_outliers": d.exclude_norm_outliers,
            "shuffle_buffer": d.shuffle_buffer,
            "lm_batch": cfg.model.batch_size,
        },
    }


def harvest_to_cache(
    cfg,
    out,
    n_tokens: int | None = None,
    *,
    model=None,
    shard_rows: int | None = None,
    eval_tokens: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    documents=None,
    forward=None,
    on_shard=None,
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """Harvest ``n_tokens`` training rows (and ``eval_tokens`` held-out rows) into ``out``.

    Resumes a partial cache in ``out`` made with the same settings. Returns the manifest.
    ``n_tokens`` defaults to the training budget of ``cfg`` (``train.tokens`` or steps x batch),
    ``eval_tokens`` to ``eval.tokens``. With several processes (one per host, all writing to
    the same ``out``) each harvests its own documents and ``1/process_count`` of the tokens
    into its own shards and manifest; readers merge the manifests.
    """
    from jsae.data.lm_source import TextActivationSource

    if n_tokens is None:
        n_tokens = cfg.train.tokens or cfg.resolved_steps() * cfg.train.batch_size
    eval_tokens = cfg.eval.tokens if eval_tokens is None else eval_tokens
    P, p = int(process_count), int(process_index)
    n_tokens = n_tokens // P + (1 if p < n_tokens % P else 0)
    eval_tokens = eval_tokens // P + (1 if p < eval_tokens % P else 0)
    shard_rows = int(shard_rows or DEFAULT_SHARD_ROWS)
    if model is None:
        from jsae.models import load

        model = load(cfg.model.path or cfg.model.name, dtype=cfg.model.dtype)
    src = TextActivationSource(cfg, model, p, P, documents=documents, forward=forward)
    meta = cache_meta(cfg, getattr(model, "name", cfg.model.name), src.d_in, shard_rows)
    w = CacheWriter(out, meta, overwrite=overwrite, process_index=p, process_count=P)
    train, ev = w.split("train"), w.split("eval")
    if train["complete"] and train["rows"] < n_tokens:  # asked for more than last time
        train["complete"] = False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n_tokens + eval_tokens,
            initial=min(train["rows"], n_tokens) + ev["rows"],
            unit="tok",
            desc="harvest",
            smoothing=0.1,
        )
    try:
        if not ev["complete"]:
            batches = src.eval_batches(eval_tokens, shard_rows)
            for i, rows in enumerate(batches):
                if i < len(ev["shards"]):
                    continue
                w.write_shard("eval", rows)
                if bar:
                    bar.update(len(rows[src.hooks[0]]))
            if getattr(src, "eval_contexts", None) is not None:
                w.write_contexts(*src.eval_contexts)
            w.mark_complete("eval")
        if train["resume"] is not None:
            src.restore(train["resume"])
        while train["rows"] < n_tokens:
            k = min(shard_rows, n_tokens - train["rows"])
            rows = src.next_batch(k)
            w.write_shard("train", rows, resume=src.state())
            if bar:
                bar.update(k)
            if on_shard is not None:
                on_shard(w)
        w.mark_complete("train")
    finally:
        if bar:
            bar.close()
    return w.manifest


class NoContextsError(FileFormatError):
    """A cache harvested before context tokens were stored beside the held-out rows."""


def read_contexts(path) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [N, T], rows bool [N, T])`` of the cache's held-out split: row ``i`` of
    the held-out shards is the ``i``-th True position of ``rows`` in row-major order."""
    man = read_manifest(path)
    c = man["splits"]["eval"].get("contexts")
    if not c or man.get("process_count", 1) > 1:
        raise NoContextsError(
            f"the activation cache at {path} has no context tokens (harvested before jsae "
            f"stored them, or by several processes); harvest it again: `jsae harvest CONFIG "
            f"--out {path} --overwrite`")
    buf = _path(path).joinpath(c["file"]).read_bytes()
    if len(buf) != c["bytes"] or hashlib.sha256(buf).hexdigest() != c["sha256"]:
        raise _damaged(_path(path) / c["file"], "its size or SHA-256 differs from the manifest")
    from jsae.validate import finite_array

    f = _path(path) / c["file"]
    t = parse_safetensors_any(buf, f)
    for k in ("tokens", "rows"):
        if k not in t:
            raise _damaged(f, f"it has no tensor {k!r}")
    tokens = finite_array(t["tokens"], "tensor 'tokens'", f, shape=(None, None), kind="i")
    rows = finite_array(t["rows"], "tensor 'rows'", f, shape=tokens.shape, kind="i")
    if int(rows.astype(bool).sum()) < man["splits"]["eval"]["rows"]:
        raise _damaged(f, f"it marks {int(rows.astype(bool).sum())} rows, the held-out split "
                       f"has {man['splits']['eval']['rows']}")
    return tokens.astype(np.int32), rows.astype(bool)


def parse_safetensors_any(buf: bytes, where) -> dict[str, np.ndarray]:
    """Any safetensors bytes as arrays of their own dtype (a damaged file: `DamagedShardError`)."""
    from safetensors.numpy import load

    try:
        return load(buf)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _damaged(where, f"not a readable safetensors file ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e


class ContextRows:
    """The held-out rows of a cache in corpus order, beside their contexts (for the atlas).

    ``tokens``/``mask``: :func:`read_contexts`; ``rows(start, n)``: ``{hook: [n, d]}`` rows
    ``start .. start + n`` of the held-out split (shards read lazily, in order)."""

    def __init__(self, path, hooks):
        self.path = _path(path)
        self.tokens, self.mask = read_contexts(path)
        man = read_manifest(path)
        missing = [h for h in hooks if h not in man["hooks"]]
        if missing:
            raise BadInput(f"hooks {missing} are not in the cache at {path} "
                             f"(it holds {', '.join(man['hooks'])})")
        self.hooks = list(hooks)
        self.shards = man["splits"]["eval"]["shards"]
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self._cur: tuple[int, dict] | None = None

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if self._cur is None or self._cur[0] != i:
            self._cur = (i, load_shard(self.path / self.shards[i]["file"], self.hooks,
                                       self.shards[i]))
        return self._cur[1]

    def rows(self, start: int, n: int) -> dict[str, np.ndarray]:
        if start + n > self.offsets[-1]:
            raise ValueError(f"held-out rows {start}..{start + n} asked, the cache has "
                             f"{int(self.offsets[-1])}")
        parts, pos = [], start
        while pos < start + n:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            a = pos - int(self.offsets[i])
            b = min(int(self.offsets[i + 1]), start + n) - int(self.offsets[i])
            sh = self._shard(i)
            parts.append({h: sh[h][a:b] for h in self.hooks})
            pos += b - a
        if not parts:
            return {h: np.zeros((0, self._shard(0)[h].shape[-1]), np.float32) for h in self.hooks}
        return {h: np.concatenate([p[h] for p in parts]) for h in self.hooks}


class CacheActivationSource:
    """ActivationSource over a cache directory (``data.source: cache``, ``data.path: DIR``)."""

    def __init__(self, cfg, process_index: int = 0, process_count: int = 1):
        self.path = _path(cfg.data.path)
        self.manifest = read_manifest(self.path)
        avail = self.manifest["hooks"]
        if getattr(getattr(cfg, "sae", None), "layers", None) == "all" and not cfg.model.hooks:
            from jsae.config import transcoder_pairs

            # a set over every layer: the layers whose input and output hooks the cache holds
            pairs = [p for p in transcoder_pairs(cfg, avail) if p[1] in avail]
            cfg.model.hooks = [p[0] for p in pairs] + [p[1] for p in pairs]
        hooks = [h for h in cfg.model.hooks if h in avail]
        missing = [h for h in cfg.model.hooks if h not in avail]
        if missing:
            raise BadInput(
                f"model.hooks {missing} are not in the cache at {cfg.data.path} "
                f"(it holds {', '.join(avail)})"
            )
        self.hooks = hooks
        self.d_in = {h: int(self.manifest["d_in"][h]) for h in hooks}
        self.shards = [s["file"] for s in self.manifest["splits"]["train"]["shards"]]
        self.eval_shards = [s["file"] for s in self.manifest["splits"]["eval"]["shards"]]
        # Size and checksum per shard (caches harvested before they were recorded have none);
        # the checksum is verified on a shard's first read in this process.
        self._expect = {s["file"]: s for sp in ("train", "eval")
                        for s in self.manifest["splits"][sp]["shards"]}
        self._verified: set[str] = set()
        if len(self.shards) < process_count:
            raise BadInput(
                f"the cache at {cfg.data.path} has {len(self.shards)} training shards, fewer "
                f"than the {process_count} processes reading it (harvest with smaller shards)"
            )
        self.stats = self.manifest.get("stats", {})
        self.seed = int(cfg.seed)
        self.process_index, self.process_count = process_index, process_count
        cap = max(int(cfg.data.shuffle_buffer), 2)
        self.mixer = ShuffleMixer(cap, seed=(self.seed * 1_000_003 + process_index) & 0x7FFFFFFF)
        self._epoch, self._i = 0, 0  # next shard to read: position i of this epoch's share

    def _order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0xCAC4E])
        order = rng.permutation(len(self.shards))
        return order[self.process_index :: self.process_count].tolist()

    def _push_next(self) -> None:
        order = self._order(self._epoch)
        if self._i >= len(order):
            self._epoch, self._i = self._epoch + 1, 0
            order = self._order(self._epoch)
        pos = {"epoch": self._epoch, "i": self._i}
        rows = self._load(self.shards[order[self._i]])
        self._i += 1
        self.mixer.push(rows, pos)

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        while True:
            b = self.mixer.pop(batch_size)
            if b is not None:
                return b
            self._push_next()

    def eval_batches(self, n_tokens: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Held-out rows, in order; each process reads its own shards (or rows, if too few)."""
        P, p = self.process_count, self.process_index
        by_shard = len(self.eval_shards) >= P
        files = self.eval_shards[p::P] if by_shard else self.eval_shards
        left: dict[str, np.ndarray] = {}
        sent = 0
        for f in files:
            rows = self._load(f)
            if not by_shard:
                rows = {h: v[p::P] for h, v in rows.items()}
            if left:
                rows = {h: np.concatenate([left[h], rows[h]]) for h in self.hooks}
            n, s = len(rows[self.hooks[0]]), 0
            while n - s >= batch_size and sent < n_tokens:
                k = min(batch_size, n_tokens - sent)
                yield {h: v[s : s + k] for h, v in rows.items()}
                s, sent = s + k, sent + k
            if sent >= n_tokens:
                return
            left = {h: v[s:] for h, v in rows.items()}
        if left and len(left[self.hooks[0]]) and sent < n_tokens:
            k = min(len(left[self.hooks[0]]), n_tokens - sent)
            yield {h: v[:k] for h, v in left.items()}

    def _load(self, name: str) -> dict[str, np.ndarray]:
        e = self._expect.get(name) or {}
        expect = {"bytes": e.get("bytes")}
        if name not in self._verified:
            expect["sha256"] = e.get("sha256")
        rows = load_shard(self.path / name, self.hooks, expect)
        for h in self.hooks:
            want = (e["rows"], self.d_in[h]) if "rows" in e else (rows[h].shape[0], self.d_in[h])
            if rows[h].shape != want:
                raise _damaged(self.path / name, f"tensor {h!r} has shape {list(rows[h].shape)}, "
                               f"the manifest says {list(want)}")
        self._verified.add(name)
        return rows

    def state(self) -> dict:
        return {
            "kind": "cache",
            "mixer": self.mixer.state(),
            "n_shards": len(self.shards),
            "process": [self.process_index, self.process_count],
        }

    def restore(self, state: dict) -> None:
        if state.get("kind") != "cache":
            raise FileFormatError(
                f"saved data position is for a {state.get('kind')!r} source, but data.source is 'cache'"
            )
        if state.get("n_shards") != len(self.shards):
            raise FileFormatError(
                f"the cache now has {len(self.shards)} training shards, the run was saved with "
                f"{state['n_shards']}; cannot resume exactly"
            )
        replay = self.mixer.restore(state["mixer"])
        pos = replay["pos"] if replay else {"epoch": 0, "i": 0}
        self._epoch, self._i = int(pos["epoch"]), int(pos["i"])

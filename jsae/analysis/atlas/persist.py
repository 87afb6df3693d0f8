"""A partial streaming pass on disk: saved atomically, resumed only by the same dictionary,
corpus and settings, and checked when read back.

The file (``<state_dir>/<hook>.state.npz``) is one ``.npz``: ``__meta__`` (JSON bytes: the
identity of the pass, :func:`pass_identity`, and ``next_context``, the first context not yet
merged) and one array per :class:`~jsae.analysis.atlas.state.AtlasState` field under the
field's name, sorted by name: names and order are those of the files written before the state
was a dataclass (they resume).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from jsae.analysis.atlas.state import AtlasState
from jsae.analysis.atlas.types import AtlasStateMismatch
from jsae.fileio import atomic_file


def _hash_arrays(h, arrays) -> None:
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())


def sae_content_hash(sae) -> str:
    """Short hash of an SAE's spec, normalisation and every parameter: a saved partial pass
    resumes only with exactly this SAE (a retrained or edited one starts over)."""
    h = hashlib.sha1(repr(sae.spec).encode())
    _hash_arrays(h, [sae.norm_scale] + [sae.params[k] for k in sorted(sae.params)])
    return h.hexdigest()[:16]


def corpus_fingerprint(tokens: np.ndarray, mask: np.ndarray) -> str:
    """Short hash of the contexts ``tokens [N, T]`` and the positions that count."""
    h = hashlib.sha1()
    _hash_arrays(h, [tokens, mask])
    return h.hexdigest()[:16]


def pass_identity(sae, hook: str, corpus: str, cfg, batch_size: int) -> dict:
    """What a saved pass must match to be resumed: the dictionary (:func:`sae_content_hash`),
    the corpus (:func:`corpus_fingerprint`), the hook, the settings (``repr`` of the
    ``StreamConfig``) and the batch size."""
    return {"sae": sae_content_hash(sae), "corpus": corpus, "hook": hook, "cfg": repr(cfg),
            "batch_size": batch_size}


def save_state(path: str | Path, state: AtlasState, meta: dict) -> None:
    """Atomically write a partial pass (``meta`` holds fingerprints and the position)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # sorted by name: the order the arrays had when the state was a dict (jit sorts dict keys)
    host = {k: np.asarray(jax.device_get(v)) for k, v in sorted(state.arrays().items())}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no .npz
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **host)


def load_state(path: str | Path, expect: Mapping, template: AtlasState | None = None,
               n_contexts: int | None = None) -> tuple[AtlasState, dict] | None:
    """A saved partial pass ``(state on the host, meta)``, or None when there is none. Refuses
    (one line) a state whose fingerprint differs from ``expect``, one without exactly the
    :class:`AtlasState` arrays and, given the ``template`` (``init_state`` of this pass) and
    ``n_contexts``, arrays of another dtype or shape, non-finite float32 values and a
    ``next_context`` outside the corpus."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path) as d:
            meta = json.loads(bytes(d["__meta__"]).decode())
            arrays = {k: d[k] for k in d.files if k != "__meta__"}
    except Exception as e:  # noqa: BLE001 - any damage means the same thing here
        raise AtlasStateMismatch(f"{path}: unreadable partial atlas state ({e}); delete it") from e
    diff = [k for k in expect if meta.get(k) != expect[k]]
    if diff:
        what = "dictionary" if "sae" in diff else "corpus or settings"
        raise AtlasStateMismatch(
            f"{path}: partial atlas state of another {what} ("
            + ", ".join(f"{k} {meta.get(k)!r} != {expect[k]!r}" for k in diff)
            + "); delete it or use another --out")
    names = AtlasState.names()
    missing = sorted(set(names) - set(arrays))
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise AtlasStateMismatch(f"{path}: partial atlas state lacks {missing} / has unknown "
                                 f"{extra} arrays; delete it")
    state = AtlasState(**{k: arrays[k] for k in names})
    if template is not None:  # the fingerprints match: the arrays must still fit them
        _check_state(path, state, meta, template, n_contexts)
    return state, meta


def _check_state(path: Path, state: AtlasState, meta: dict, template: AtlasState,
                 n_contexts) -> None:
    """Every array of a saved partial pass has the dtype and shape of the template, finite
    values, and ``next_context`` is a position in the corpus (one-line refusal)."""
    from jsae import validate as v
    from jsae.errors import FileFormatError

    got = state.arrays()
    for k, t in template.arrays().items():
        a = got[k]
        if a.dtype != np.asarray(t).dtype or a.shape != np.shape(t):
            raise AtlasStateMismatch(f"{path}: array {k!r} is {a.dtype} {list(a.shape)}, expected "
                                     f"{np.asarray(t).dtype} {list(np.shape(t))}; delete it")
        if a.dtype == np.float32 and not np.isfinite(a).all():  # float16 windows may overflow
            raise AtlasStateMismatch(f"{path}: array {k!r} holds non-finite values; delete it")
    try:
        v.field(meta, "next_context", int, path, lo=0, hi=n_contexts)
    except FileFormatError as e:
        raise AtlasStateMismatch(f"{e}; delete it") from e

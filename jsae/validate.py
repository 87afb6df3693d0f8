"""Checks for what jsae reads back from a file: every field as strictly as a value a user types.

A file jsae wrote earlier (a detector, a cache manifest, an SAE's weights, an analysis cache,
an atlas state) may since have been damaged, edited by hand, or come from another tool. Each
reader checks the fields it uses with these helpers, which raise one
:class:`~jsae.errors.FileFormatError` naming the file and the field (``FILE: field 'x' is ...;
expected ...``) instead of letting a wrong type or shape fail later with a traceback.

>>> d = read_json(path, "detector file")
>>> k = field(d, "d_sae", int, path, lo=1)
>>> w = finite_array(tensors["W_enc"], "W_enc", path, shape=(None, None))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jsae.errors import FileFormatError

F32_MAX = float(np.finfo(np.float32).max)
_MISSING = object()


def bad(file, name: str, why: str) -> FileFormatError:
    """A :class:`FileFormatError` ``FILE: NAME why`` (one line)."""
    msg = f"{file}: {name} {why}" if name else f"{file}: {why}"
    return FileFormatError(" ".join(msg.split()))


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def read_json(path, what: str = "JSON file") -> Any:
    """The JSON in ``path``, or a :class:`FileFormatError` saying it is not UTF-8 JSON (a missing
    file stays a ``FileNotFoundError``)."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError as e:
        raise FileFormatError(f"{path}: a folder, not a {what}") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not a {what} (not UTF-8 text: {e.reason} at byte "
                              f"{e.start})") from e
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: not a {what} (invalid JSON: {e.msg} at line {e.lineno} "
                              f"column {e.colno})") from e


def mapping(v: Any, name: str, file) -> dict:
    """``v`` if it is a JSON object (a dict), else a one-line error."""
    if not isinstance(v, Mapping):
        raise bad(file, name or "the file", f"is {type(v).__name__} {_short(v)}; expected a JSON "
                  "object")
    return dict(v)


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "an object", type(None): "null"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(type(None) if t is None else t, getattr(t, "__name__", str(t)))
                       for t in ts)


def value(v: Any, name: str, types, file, *, lo=None, hi=None, lo_open: bool = False,
          choices: Sequence | None = None, float32: bool = False) -> Any:
    """Check one value read from ``file``: its type (``int`` never accepts a bool; ``float``
    accepts an int and must be finite), its range ``[lo, hi]`` (``lo_open``: ``> lo``), one of
    ``choices``, and (``float32``) that it stays finite as a float32."""
    ts = types if isinstance(types, tuple) else (types,)
    ok = False
    for t in ts:
        if t is None or t is type(None):
            ok = ok or v is None
        elif t is int:
            ok = ok or (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)))
        elif t is float:
            ok = ok or (isinstance(v, (int, float, np.integer, np.floating))
                        and not isinstance(v, (bool, np.bool_)))
        else:
            ok = ok or isinstance(v, t)
    if not ok:
        raise bad(file, f"field {name!r}", f"is {_short(v)}; expected {_type_name(types)}")
    if v is None:
        return v
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        if not math.isfinite(float(v)):
            raise bad(file, f"field {name!r}", f"is {v!r}; expected a finite number")
        if float32 and abs(float(v)) > F32_MAX:
            raise bad(file, f"field {name!r}", f"is {v!r}, beyond float32's range (+-{F32_MAX:.3g})")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise bad(file, f"field {name!r}", f"is {v!r}; expected {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise bad(file, f"field {name!r}", f"is {v!r}; expected <= {hi}")
    if choices is not None and v not in choices:
        raise bad(file, f"field {name!r}", f"is {_short(v)}; expected one of "
                  + ", ".join(repr(c) for c in choices))
    return v


def field(d: Mapping, key: str, types, file, *, default: Any = _MISSING, prefix: str = "",
          **checks) -> Any:
    """``d[key]`` checked by :func:`value`; a missing key is an error unless ``default`` is
    given (``prefix``: the dotted path of ``d`` in the file, for the message)."""
    name = f"{prefix}{key}"
    if key not in d:
        if default is not _MISSING:
            return default
        raise bad(file, f"field {name!r}", "is missing")
    return value(d[key], name, types, file, **checks)


def number_list(d: Mapping, key: str, file, *, n: int | None = None, none_ok: bool = False,
                prefix: str = "", integer: bool = False, **checks) -> list:
    """``d[key]``: a list of finite numbers (``integer``: ints; ``none_ok``: null allowed), of
    length ``n`` when given, each checked by :func:`value` (``lo``, ``hi``, ``float32``...)."""
    name = f"{prefix}{key}"
    v = field(d, key, list, file, prefix=prefix)
    if n is not None and len(v) != n:
        raise bad(file, f"field {name!r}", f"has {len(v)} entries; expected {n}")
    t = int if integer else float
    return [value(x, f"{name}[{i}]", (t, None) if none_ok else t, file, **checks)
            for i, x in enumerate(v)]


def finite_array(a, name: str, file, *, shape: Sequence[int | None] | None = None,
                 kind: str = "f", finite: bool = True) -> np.ndarray:
    """``a`` as an array of dtype kind ``kind`` (``f`` float, ``i`` integer: ``iu``, ``b``),
    of ``shape`` (``None`` = any size on that axis) when given, with only finite values."""
    a = np.asarray(a)
    kinds = {"f": "fiu", "i": "iu", "b": "b", "fb": "fiub"}.get(kind, kind)
    if a.dtype.kind not in kinds:
        raise bad(file, name, f"holds {a.dtype} values; expected "
                  + {"f": "numbers", "i": "integers", "b": "booleans"}.get(kind, kind))
    if shape is not None:
        want = tuple(shape)
        if a.ndim != len(want) or any(w is not None and g != w for g, w in zip(a.shape, want)):
            shown = "[" + ", ".join("N" if w is None else str(w) for w in want) + "]"
            raise bad(file, name, f"has shape {list(a.shape)}; expected {shown}")
    if finite and a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        n = int(a.size - np.isfinite(a).sum())
        raise bad(file, name, f"holds {n} non-finite value(s) (NaN or inf) of {a.size}")
    return a


__all__ = ["F32_MAX", "bad", "field", "finite_array", "mapping", "number_list", "read_json",
           "value"]

"""JSON that stays JSON: non-finite floats become an explicit ``null``, never ``NaN``.

``json.dumps(float("nan"))`` writes ``NaN``, which strict readers (browsers, jq, most
languages) reject.  jsae writes every metrics file through :func:`dumps`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (also NumPy scalars and arrays) replaced by None."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalar / array
        return finite(obj.tolist())
    return obj


def non_finite_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every non-finite float in ``obj`` (to name them in a warning)."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in non_finite_keys(v, f"{prefix}{key}.")]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in non_finite_keys(v, f"{prefix}{i}.")]
    if hasattr(obj, "tolist") and not isinstance(obj, (int, float)):
        return non_finite_keys(obj.tolist(), prefix)
    if isinstance(obj, float) and not math.isfinite(obj):
        return [prefix.rstrip(".")]
    return []


def dumps(obj: Any, **kw) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kw)


def write(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON atomically (temp file + rename)."""
    from jsae.fileio import write_text

    return write_text(Path(path), dumps(obj, indent=indent))


__all__ = ["dumps", "finite", "non_finite_keys", "write"]

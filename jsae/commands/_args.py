"""argparse types that range-check numbers, so `--tokens -5` or `--value nan` is refused at once.

argparse turns the ``ArgumentTypeError`` into ``jsae CMD: error: argument --tokens: ...`` and
exit code 2, before any model or file is touched.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not (math.isfinite(f) and f.is_integer()):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        return int(f)


def positive_int(text: str) -> int:
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def probability(text: str) -> float:
    """A top-p style mass in (0, 1]."""
    v = finite_float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return v


def steer_value(text: str) -> str:
    """A clamp value ``12.5`` or ``NUMx`` (times the feature's peak); kept as text, checked."""
    s = str(text).strip().lower()
    v = finite_float(s[:-1] if s.endswith("x") else s)
    if abs(v) > FLOAT32_MAX:  # finite here, infinite in the model's float32 activations
        raise argparse.ArgumentTypeError(f"{text!r} does not fit float32 (|value| <= 3.4e38)")
    return text


FLOAT32_MAX = 3.4028234663852886e38

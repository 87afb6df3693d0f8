"""Stop a run whose loss or FVU explodes, naming the step (as non-finite values already do).

A diverged SAE (learning rate far too high, broken inputs) otherwise trains to the end and
reports a held-out FVU of 1e14 with exit code 0.  The rule is deliberately loose so that no
healthy run trips it: FVU above ``MAX_FVU`` (reconstruction error a hundred times the data's
variance around its mean; the mean alone gives 1) or a loss ``LOSS_GROWTH`` times its lowest
value so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from jsae.errors import JsaeError

MAX_FVU = 100.0
LOSS_GROWTH = 1e4


class TrainingDiverged(JsaeError, FloatingPointError):
    """Non-finite or exploding training metrics; the message names the step and what to do."""


class DivergenceGuard:
    """:meth:`problem` of each logged step's flat metrics: a message, or None when healthy."""

    def __init__(self):
        self.best_loss: dict[str, float] = {}

    def problem(self, step: int, flat: dict[str, float]) -> str | None:
        bad = [k for k, v in flat.items() if not math.isfinite(v)]
        if bad:
            return f"non-finite {', '.join(bad)} at step {step}"
        for k, v in flat.items():
            name = k.rsplit("/", 1)[-1]
            if name == "fvu" and v > MAX_FVU:
                return (f"training diverged at step {step}: {k} = {v:.4g} (over {MAX_FVU:g}; "
                        "predicting the mean gives 1)")
            if name == "loss":
                best = self.best_loss.get(k)
                if best is not None and best > 0 and v > LOSS_GROWTH * best:
                    return (f"training diverged at step {step}: {k} = {v:.4g}, {v / best:.3g}x "
                            f"its lowest value so far ({best:.4g})")
                if v > 0:
                    self.best_loss[k] = v if best is None else min(best, v)
        return None

    def check(self, step: int, flat: dict[str, float], hint: str | Callable[[], str] = "") -> None:
        """Raise :class:`TrainingDiverged` (with what to do, and ``hint``) on a problem; a
        callable ``hint`` is only called then (e.g. naming the last good checkpoint)."""
        msg = self.problem(step, flat)
        if msg:
            hint = hint() if callable(hint) else hint
            raise TrainingDiverged(msg + "; lower train.lr or check the input activations"
                                   + (f"; {hint}" if hint else ""))


__all__ = ["DivergenceGuard", "TrainingDiverged", "MAX_FVU", "LOSS_GROWTH"]

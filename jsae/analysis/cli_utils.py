"""Helpers shared by the `jsae steer|features|monitor` commands (argument parsing, output)."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap


def use_color(choice: str = "auto", stream=None) -> bool:
    stream = sys.stdout if stream is None else stream
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def token_repr(tokenizer, i: int) -> str:
    """A token as a quoted string, e.g. ``' Bridge'``."""
    s = tokenizer.decode([int(i)])
    return repr(s if s else (tokenizer.id_to_token(int(i)) if hasattr(tokenizer, "id_to_token") else f"<{i}>"))


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int | None = None,
                 newline: str = "⏎") -> str:
    """Two texts in wrapped columns under their titles (line breaks shown as ``newline``, so
    the columns stay comparable; ``newline=None`` keeps them)."""
    width = width or min(shutil.get_terminal_size((120, 20)).columns, 160)
    col = max(20, (width - 3) // 2)

    def wrap(t: str) -> list[str]:
        if newline is not None:
            t = t.replace("\r", "").replace("\n", newline)
        out = []
        for para in t.split("\n"):
            out.extend(textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=False) or [""])
        return out

    a, b = [left_title, "-" * len(left_title)] + wrap(left), [right_title, "-" * len(right_title)] + wrap(right)
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return "\n".join(f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b))


def parse_value(v: str):
    """``"12.5"`` -> ``("abs", 12.5)``; ``"10x"`` -> ``("max", 10.0)`` (times the feature's
    largest activation seen on the corpus)."""
    s = str(v).strip().lower()
    if s.endswith("x"):
        return "max", float(s[:-1])
    return "abs", float(s)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

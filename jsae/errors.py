"""Expected errors: bad input, a missing file, source or optional dependency.

Every error a user can cause derives from :class:`JsaeError`; the ``jsae`` command prints it as
one line (``jsae CMD: message``) and exits with code 2, while anything else is a bug and shows its
traceback. Each class also keeps the builtin base older code caught (``ValueError``, ...).
"""

from __future__ import annotations

import importlib


class JsaeError(Exception):
    """An expected error whose message names the key, file or shape and what would work."""


class MissingDependency(JsaeError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


class FileFormatError(JsaeError, ValueError):
    """A file that is missing, truncated, damaged or not of the expected kind."""


class ModelLoadError(JsaeError, ValueError):
    """A language model that cannot be found, read or built."""


class BadInput(JsaeError, ValueError):
    """A value a user gave (an option, a feature id, an array's shape) that cannot work."""


class OutputRefused(JsaeError, ValueError):
    """A destination a command may not write: not empty and not its own, or a run or a cache."""


def require(module: str, extra: str, purpose: str = ""):
    """Import ``module`` or raise :class:`MissingDependency` naming ``pip install 'jsae[extra]'``.

    >>> tfds = require("tensorflow_datasets", "demo", "the offline corpus")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f"{purpose} needs" if purpose else "needs"
        raise MissingDependency(
            f"{what} the Python package {module.split('.')[0]!r} ({e.name or module} is not "
            f"installed): pip install 'jsae[{extra}]'".strip()
        ) from e

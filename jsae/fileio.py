"""Atomic writes: a file or a folder appears whole or not at all.

Everything jsae writes that another step reads again (SAE folders, exports, the model cache,
cache shards and manifests, configs, metrics, atlas states, detectors) goes through here: the
content is written under a temporary name next to the destination and renamed into place when
it is complete, so a crash, a full disk or Ctrl-C never leaves a half-written file where a
reader looks, and the temporary is removed when writing fails.

Paths may be ``str``, ``pathlib.Path`` or ``etils.epath.Path`` (``gs://`` caches).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path) -> Iterator:
    """Yields a temporary path next to ``path`` (a hidden name ending in ``.tmp``, so globs for the
    real files never match it); when the block ends without an error it replaces ``path``,
    otherwise it is removed. (``np.savez`` appends ``.npz`` to names: give it an open file.)"""
    path = Path(path) if isinstance(path, str) else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def write_text(path, text: str):
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path) if isinstance(path, str) else path


def write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path) if isinstance(path, str) else path


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@contextmanager
def atomic_folder(path: str | Path, *, replace: bool = True,
                  keep_existing: Callable[[Path], bool] | None = None,
                  owner: str = "jsae") -> Iterator[Path]:
    """Yields an empty temporary folder next to ``path`` to fill; when the block succeeds it
    becomes ``path``, otherwise it is removed. The folder gets ``jsae.outputs``'s marker naming
    ``owner`` (the command that writes it) and its files.

    ``replace=True``: an older ``path`` that holds only what ``owner`` wrote (its marker's
    files, or the names written now) is swapped out whole and deleted; one that holds anything
    else keeps it: only the new files are moved in, and only files the old marker lists are
    removed. ``replace=False`` (caches shared by concurrent processes): the rename fails if
    another process put a folder there first; ``keep_existing(path)`` says whether theirs is
    whole (then this one is discarded), else the error is raised.
    """
    from jsae import outputs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, _default_mode())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        new = _entries(tmp) - {outputs.MARKER}
        if not replace:
            try:
                os.rename(tmp, path)
            except OSError:
                if keep_existing is None or not keep_existing(path):
                    raise
            return
        outputs.write_marker(tmp, owner, new)
        if not path.exists():
            os.replace(tmp, path)
            return
        before = {f.split("/")[0] for f in outputs.marked_files(path, owner)}
        old = _entries(path)
        if old <= before | new | {outputs.MARKER}:  # only what this command wrote: swap whole
            aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
            return
        for name in sorted(new):  # someone else's files are here too: replace ours only
            dst = path / name
            if dst.is_dir() and not dst.is_symlink():
                if name not in before:
                    raise FileExistsError(f"{dst} is a folder jsae did not write; not replacing it")
                shutil.rmtree(dst)
            os.replace(tmp / name, dst)
        for name in before - new:
            stale = path / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.exists() or stale.is_symlink():
                stale.unlink()
        os.replace(tmp / outputs.MARKER, path / outputs.MARKER)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["atomic_file", "atomic_folder", "write_bytes", "write_text"]

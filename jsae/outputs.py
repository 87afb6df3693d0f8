"""What a command may write: one rule for every output folder and output file.

A command writes only into a destination that

- does not exist yet, or is an empty folder;
- it wrote before: the folder holds jsae's marker ``.jsae-output.json`` naming the command that
  wrote it and the files it wrote (or, for what older versions wrote, the command's own
  manifest: an atlas's ``atlas.npz``, a jsae SAE folder's ``sae.json``, an exported SAELens
  folder's ``cfg.json`` that names its jsae run);
- or the user said ``--overwrite``; even then only the files the command writes are replaced,
  and nothing else in the folder is removed;

and never into, or above, a training run directory or an activation cache (a run's own
subfolders that another command owns, such as ``RUN/atlas``, are fine). A refusal happens
before any work, as one :class:`~jsae.errors.OutputRefused` line naming the path and what is
there.

The marker lists what the command wrote, so a later run of the same command removes only
files it wrote itself (an old site's shards), never a file it did not write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from jsae.errors import OutputRefused

MARKER = ".jsae-output.json"
# A run directory's own entries: nothing but `jsae train` writes there.
RUN_RESERVED = ("saes", "checkpoints", "checkpoints_corrupt", "history", "config.yaml",
                "metrics.csv", "summary.json", "plots", "tb")
_SCAN_DEPTH = 2        # how far below a destination to look for runs and caches
_SCAN_ENTRIES = 5000   # and how many entries at most (a huge folder is refused as not empty)


def _remote(path) -> bool:
    return "://" in str(path)


def is_run_dir(path: Path) -> bool:
    """A `jsae train` run directory (its config or its dictionaries and checkpoints)."""
    return path.is_dir() and ((path / "saes").is_dir() or (path / "checkpoints").is_dir()
                              or (path / ".jsae-train.lock").exists()
                              or ((path / "config.yaml").is_file()
                                  and (path / "metrics.csv").is_file()))


def is_cache_dir(path: Path) -> bool:
    """A `jsae harvest` activation cache (its manifest or per-process manifests)."""
    if not path.is_dir():
        return False
    if (path / "manifest.json").is_file():
        return True
    return any(path.glob("manifest-*-of-*.json"))


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` ({"written_by", "files"}), None if absent or unreadable."""
    try:
        doc = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("written_by"), str)
            and isinstance(doc.get("files"), list)
            and all(isinstance(f, str) for f in doc["files"])):
        return None
    return doc


def written_by(folder: Path) -> str | None:
    m = read_marker(folder)
    return m["written_by"] if m else None


def marked_files(folder: Path, command: str) -> list[str]:
    """The files ``command`` recorded in ``folder``'s marker (relative, '/' separated)."""
    m = read_marker(folder)
    if not m or m["written_by"] != command:
        return []
    return [f for f in m["files"] if _safe_relative(f)]


def _safe_relative(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def write_marker(folder: Path, command: str, files: Iterable[str]) -> None:
    """Record that ``command`` wrote ``files`` (relative names; a name ending in '/' is a
    whole subfolder) into ``folder``."""
    from jsae.fileio import write_text

    names = sorted({str(f) for f in files if str(f) and str(f) != MARKER})
    write_text(Path(folder) / MARKER, json.dumps({"written_by": command, "files": names},
                                                  indent=1) + "\n")


def _describe(folder: Path) -> str:
    """A few of the entries of ``folder``, for a refusal."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as e:
        return f"unreadable ({e.strerror})"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} {'entry' if len(names) == 1 else 'entries'}: {shown}"


def _check_not_run_or_cache(path: Path, command: str, *, below: bool,
                            cache_ok: bool = False) -> None:
    """Refuse ``path`` when it is, lies inside (in a reserved part), or (``below``) holds a
    run directory or (unless ``cache_ok``: `jsae harvest` resuming its own) a cache."""
    path = Path(os.path.abspath(path))
    if path.exists() and is_run_dir(path):
        raise OutputRefused(f"{path} is a training run directory; {command} does not write "
                            "into a run: choose another output folder")
    if path.exists() and is_cache_dir(path) and not cache_ok:
        raise OutputRefused(f"{path} is an activation cache (manifest.json); {command} does "
                            "not write into a cache: choose another output folder")
    child = path
    for parent in path.parents:
        if is_cache_dir(parent):
            raise OutputRefused(f"{path} is inside the activation cache {parent}; choose an "
                                "output folder outside it")
        if is_run_dir(parent) and child.name in RUN_RESERVED:
            where = "is" if child == path else f"is inside {child.name}/ of"
            raise OutputRefused(f"{path} {where} the training run {parent}'s own "
                                f"{child.name}; choose an output folder outside it (e.g. "
                                f"{parent / 'export'})")
        child = parent
    if below and path.is_dir():
        seen = 0
        frontier = [path]
        for _ in range(_SCAN_DEPTH):
            nxt = []
            for d in frontier:
                try:
                    entries = [e for e in d.iterdir() if e.is_dir() and not e.is_symlink()]
                except OSError:
                    continue
                for e in entries:
                    seen += 1
                    if seen > _SCAN_ENTRIES:
                        return
                    if is_run_dir(e):
                        raise OutputRefused(f"{path} holds the training run {e}; {command} "
                                            "does not write above a run: choose another "
                                            "output folder")
                    if is_cache_dir(e):
                        raise OutputRefused(f"{path} holds the activation cache {e}; choose "
                                            "another output folder")
                    nxt.append(e)
            frontier = nxt


def _no_file_above(path: Path) -> None:
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputRefused(f"{parent} is a file, so nothing can be written at {path}")


def claim_folder(path, command: str, *, overwrite: bool = False,
                 recognise: Callable[[Path], bool] | None = None, cache_ok: bool = False) -> Path:
    """Check that ``command`` (e.g. ``"jsae export"``) may write the folder ``path``.

    Allowed: a missing or empty folder, one whose marker names ``command`` (or that
    ``recognise(path)`` says ``command`` wrote, for folders written before markers), or any
    folder with ``overwrite``; never a file, a run directory, a cache, a folder holding one or
    a run's reserved part. Raises :class:`OutputRefused` naming the path; returns it.
    """
    if _remote(path):
        return path
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputRefused(f"{path} is a file, not a folder; give {command} a folder that "
                            "does not exist yet (or an empty one)")
    _no_file_above(path)
    _check_not_run_or_cache(path, command, below=True, cache_ok=cache_ok)
    if not path.exists() or overwrite:
        return path
    try:
        empty = not any(path.iterdir())
    except OSError as e:
        raise OutputRefused(f"{path}: cannot list it ({e.strerror})") from None
    if empty:
        return path
    owner = written_by(path)
    if owner == command or (owner is None and recognise is not None and recognise(path)):
        return path
    what = f"written by `{owner}`" if owner else "not written by jsae"
    raise OutputRefused(f"{path} is not empty ({_describe(path)}; {what}); {command} writes "
                        "only into a new or empty folder or one it wrote before: choose "
                        "another folder, or pass --overwrite to write its files there (nothing "
                        "else in it is removed)")


def claim_run_dir(path) -> Path:
    """Check that `jsae train` may use ``path`` as its run directory: new, empty, or a run
    (its own, to resume or extend); never a cache, a folder of other files, a folder holding
    runs, or a part of another run."""
    if _remote(path):
        return path
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputRefused(f"run_dir {path} exists and is not a directory; choose another "
                            "--run-dir")
    _no_file_above(path)
    if path.is_dir() and is_run_dir(path):
        _check_not_run_or_cache(path.parent, "jsae train", below=False)
        return path
    _check_not_run_or_cache(path, "jsae train", below=True)
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".jsae-train.lock")]
        if entries and not (path / "config.yaml").is_file():
            raise OutputRefused(f"run_dir {path} is not empty ({_describe(path)}) and is not a "
                                "jsae run; choose a new or empty --run-dir")
    return path


def claim_file(path, command: str, *, overwrite: bool = False,
               recognise: Callable[[Path], bool] | None = None) -> Path:
    """Check that ``command`` may write the file ``path``: it does not exist, or ``command``
    wrote it before (listed in the marker beside it, or ``recognise(path)`` for files written
    before markers), or ``overwrite``; never a folder, a run's reserved file or anything inside
    a cache."""
    if _remote(path):
        return path
    path = Path(path)
    if path.is_dir():
        raise OutputRefused(f"{path} is a folder; give {command} a file name (e.g. "
                            f"{path / 'out.json'})")
    _no_file_above(path)
    _check_not_run_or_cache(path, command, below=False)
    if path.parent.exists() and is_run_dir(path.parent) and path.name in RUN_RESERVED:
        raise OutputRefused(f"{path} is the training run's own {path.name}; choose another "
                            "file name")
    if not path.exists() and not path.is_symlink() or overwrite:
        return path
    if path.name in marked_files(path.parent, command):
        return path
    if recognise is not None and path.is_file():
        try:
            if recognise(path):
                return path
        except (OSError, ValueError, UnicodeDecodeError):
            pass
    raise OutputRefused(f"{path} exists and was not written by {command}; choose another "
                        "file name, or pass --overwrite to replace it")


def record(folder, command: str, names: Iterable[str]) -> None:
    """Add ``names`` (relative to ``folder``; 'sub/' for a whole subfolder) to the marker of
    ``folder`` as written by ``command``; a folder another command marked keeps its marker."""
    if _remote(folder):
        return
    folder = Path(folder)
    m = read_marker(folder)
    if m and m["written_by"] != command:
        return
    write_marker(folder, command, [*(m["files"] if m else []), *names])


def json_with(*keys: str) -> Callable[[Path], bool]:
    """``recognise`` for a JSON file jsae wrote: an object with all of ``keys``."""
    def check(path: Path) -> bool:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(doc, dict) and all(k in doc for k in keys)
    return check


def record_file(path, command: str) -> None:
    """After writing ``path``: add it to the marker beside it (so a rerun may replace it)."""
    if not _remote(path):
        record(Path(path).parent, command, [Path(path).name])


__all__ = ["MARKER", "claim_file", "claim_folder", "claim_run_dir", "is_cache_dir", "is_run_dir", "json_with",
           "marked_files", "read_marker", "record", "record_file", "write_marker", "written_by"]

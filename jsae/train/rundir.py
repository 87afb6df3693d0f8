"""The run directory as a guarded store: a lock, admission of a run, history of what it replaces.

``jsae train`` calls, in order (through `jsae.train.run.Run`, which owns the run's life):

- :func:`acquire_lock` - ``RUN/.jsae-train.lock`` (pid, host, start time). A second ``jsae
  train`` on the same directory is refused with who holds it; a lock left by a dead process on
  this host is taken over with a warning.
- :func:`admit` - read-only look at what the directory holds, before any work: a finished
  dictionary (``saes/``) is never replaced by a different config unless ``fresh`` (which moves
  the whole old run aside to ``RUN.old-<time>/``, never deletes it); the same finished config
  again is "nothing to do".
- :func:`accept` - once the checkpoint (if any) has been checked against the config: the
  resolved config is written atomically, the previous one kept under ``RUN/history/<time>/``;
  ``metrics.csv`` rows past the resumed step (or all rows, on a restart without checkpoints)
  and a ``saes/`` that will be retrained move there too, so nothing is duplicated or lost.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jsae.config import RunConfig, comparable, to_dict
from jsae.errors import JsaeError
from jsae.fileio import write_text

LOCK_NAME = ".jsae-train.lock"
HISTORY = "history"
# Keys that do not change the dictionary a run trains: they may differ on a rerun.
_IGNORED = ("run_dir", "train.progress", "checkpoint.", "eval.show_features",
            "eval.show_features_contexts")
_EXTENSION = ("train.steps", "train.tokens")


class RunDirError(JsaeError, RuntimeError):
    """The run directory cannot take this run as it is (held, or a different finished run)."""


def stamp() -> str:
    """A UTC time stamp for folder names: 20261202T063400Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _unique(path: Path) -> Path:
    out, n = path, 1
    while out.exists():
        out, n = path.with_name(f"{path.name}.{n}"), n + 1
    return out


# ---- the lock -----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


@dataclass
class RunLock:
    """A held run-directory lock; :meth:`release` removes it (and a directory it created)."""

    path: Path
    token: str
    created_dir: bool = False
    released: bool = field(default=False, init=False)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        if self.created_dir:  # a refused run leaves no empty directory behind
            try:
                self.path.parent.rmdir()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_lock(run_dir: str | Path) -> dict | None:
    """The lock's contents (pid, host, started, command), or None when the run is not held."""
    p = Path(run_dir) / LOCK_NAME
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _create_exclusive(tmp: Path, lock: Path, text: str) -> None:
    """Create ``lock`` holding ``text``, failing with FileExistsError when it exists."""
    try:
        os.link(tmp, lock)  # atomic, and the lock is never seen half-written
    except FileExistsError:
        raise
    except OSError:  # no hard links (some network / FUSE mounts): O_EXCL instead
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)


def acquire_lock(run_dir: str | Path, *, log: Callable[[str], None] = print) -> RunLock:
    """Hold ``run_dir`` for this process; :class:`RunDirError` names the holder otherwise."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} exists and is not a directory; choose another "
                          "--run-dir")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    token = os.urandom(8).hex()
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "token": token}
    tmp = run_dir / f"{LOCK_NAME}.{os.getpid()}.{token}.tmp"
    tmp.write_text(json.dumps(info))
    try:
        for _ in range(3):
            try:
                _create_exclusive(tmp, lock, json.dumps(info))
                return RunLock(lock, token, created)
            except FileExistsError:
                pass
            held = read_lock(run_dir)
            if held is None:  # released meanwhile
                continue
            pid, host = held.get("pid"), held.get("host")
            stale = host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
            if not stale:
                if not held:
                    raise RunDirError(
                        f"run directory {run_dir} has an unreadable lock file {lock}; if no "
                        "`jsae train` is using it, delete that file")
                raise RunDirError(
                    f"run directory {run_dir} is in use by `jsae train` (pid {pid} on {host}, "
                    f"started {held.get('started')}); wait for it to finish or choose another "
                    f"--run-dir (if that process is gone, delete {lock})")
            log(f"warning: taking over the lock of {run_dir}: pid {pid} on {host} (started "
                f"{held.get('started')}) is no longer running")
            os.replace(tmp, lock)
            tmp.write_text(json.dumps(info))
            if (read_lock(run_dir) or {}).get("token") == token:
                return RunLock(lock, token, created)
        raise RunDirError(f"could not take the lock {lock}: another process keeps taking it")
    finally:
        tmp.unlink(missing_ok=True)


# ---- what the directory holds ---------------------------------------------------------------


def _norm(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples -> lists, as YAML reads them back


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every config key that differs and changes the dictionary."""
    out = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b), key=str):
            va, vb, key = a.get(k), b.get(k), f"{prefix}{k}"
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, key + ".")
            elif va != vb and not any(key == i or (i.endswith(".") and key.startswith(i))
                                      or key.startswith(i + ".") for i in _IGNORED):
                out.append((key, va, vb))

    walk(_norm(old or {}), _norm(new), "")
    return out


def _describe(diffs) -> str:
    parts = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:6]]
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return "; ".join(parts) + more


def read_run_config(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def finished_hooks(run_dir: str | Path) -> list[str]:
    """The dictionaries saved under ``saes/`` (a hidden folder is a save that was cut off; a
    family member's is ``<hook>/<name>``)."""
    saes = Path(run_dir) / "saes"
    if not saes.is_dir():
        return []
    found = [*saes.glob("*/sae.json"), *saes.glob("*/*/sae.json")]
    return sorted(str(p.parent.relative_to(saes)) for p in found
                  if not any(q.startswith(".") for q in p.parent.relative_to(saes).parts))


def _finished_whole(run_dir: Path) -> bool:
    """The run's last act, summary.json, was written: a run killed during its final save (its
    dictionaries, its held-out numbers) is not finished, it resumes from its last checkpoint."""
    try:
        import json

        return isinstance(json.loads((run_dir / "summary.json").read_text()), dict)
    except (OSError, ValueError):
        return False


@dataclass
class Admission:
    """What :func:`admit` decided: ``finished`` = nothing to do (same config, already done)."""

    finished: bool = False
    moved_to: Path | None = None
    notes: list[str] = field(default_factory=list)


def _entries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME and not (
        p.name.startswith(LOCK_NAME) and p.name.endswith(".tmp"))] if run_dir.is_dir() else []


def move_run_aside(run_dir: Path) -> Path:
    """Move everything in ``run_dir`` (but the lock) to a sibling ``RUN.old-<time>/``."""
    dst = _unique(run_dir.with_name(f"{run_dir.name}.old-{stamp()}"))
    dst.mkdir(parents=True)
    for p in _entries(run_dir):
        shutil.move(str(p), str(dst / p.name))
    return dst


def admit(cfg: RunConfig, *, fresh: bool = False, write: bool = True,
          log: Callable[[str], None] = print) -> Admission:
    """Decide whether ``cfg`` may train in its run directory (see the module docstring).

    Read-only but for ``fresh``; ``write=False`` (processes other than 0) only decides.
    """
    from jsae.train.checkpoint import latest_checkpoint

    run_dir = Path(cfg.run_dir)
    out = Admission()
    entries = _entries(run_dir)
    if fresh:
        if entries and write:
            out.moved_to = move_run_aside(run_dir)
            log(f"--fresh: moved the previous run in {run_dir} to {out.moved_to}")
        return out
    hooks = finished_hooks(run_dir)
    if not hooks:
        if not _finished_whole(run_dir) and (latest_checkpoint(run_dir) or 0) >= cfg.resolved_steps():
            out.notes.append(f"{run_dir} was stopped during its final save; finishing it from "
                             "its last checkpoint")
        return out
    old = read_run_config(run_dir)
    diffs = config_diff(comparable(old), to_dict(cfg)) if old else [("config.yaml", None, "missing")]
    step = latest_checkpoint(run_dir)
    total = cfg.resolved_steps()
    extends = (diffs and all(k in _EXTENSION for k, _, _ in diffs) and step is not None
               and step < total)
    if not diffs and (step is None or step >= total) and _finished_whole(run_dir):
        out.finished = True
        return out
    if not diffs and step is not None and step >= total:
        out.notes.append(f"{run_dir} was stopped during its final save; finishing it from the "
                         f"checkpoint of step {step}")
        return out
    if extends:
        out.notes.append(f"continuing the finished run from step {step} to {total}; the "
                         f"previous dictionary is kept under {run_dir / HISTORY}")
        return out
    if not diffs:  # same config, checkpoint before the end: an interrupted rerun; resume
        return out
    raise RunDirError(
        f"run directory {run_dir} holds a finished dictionary (saes/{hooks[0]}) trained with "
        f"a different config ({_describe(diffs)}); `jsae train --fresh` moves that run aside to "
        f"{run_dir.name}.old-<time>/ and starts over, or choose another --run-dir")


# ---- once the run is accepted ---------------------------------------------------------------


def _metrics_rows(path: Path) -> tuple[list[str], list[dict]] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text)


def accept(cfg: RunConfig, start_step: int, total_steps: int, *,
           log: Callable[[str], None] = print) -> Path | None:
    """Write the resolved config and make the directory consistent with ``start_step``.

    Returns the history folder used (None when nothing had to be kept).
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hist = _unique(run_dir / HISTORY / stamp())
    kept: list[str] = []

    def keep(p: Path, *, copy: bool) -> None:
        hist.mkdir(parents=True, exist_ok=True)
        (shutil.copy2 if copy else shutil.move)(str(p), str(hist / p.name))
        kept.append(p.name)

    cfg_path = run_dir / "config.yaml"
    old = read_run_config(run_dir)
    new = to_dict(cfg)
    if old is not None and _norm({**old, "run_dir": None}) != _norm({**new, "run_dir": None}):
        keep(cfg_path, copy=True)
    _atomic_write(cfg_path, yaml.safe_dump(new, sort_keys=False))

    metrics = run_dir / "metrics.csv"
    parsed = _metrics_rows(metrics)
    if parsed is not None:
        fields, rows = parsed
        # Rows past the resumed step will be logged again; at the end, the final eval rows too.
        kept_rows = [r for r in rows if _step(r) < start_step or (
            _step(r) == start_step and (start_step < total_steps or not _only_eval(r)))]
        if len(kept_rows) != len(rows):
            if start_step == 0:
                log(f"note: no checkpoint to resume from in {run_dir / 'checkpoints'}: training "
                    f"starts over at step 0; the earlier metrics.csv is kept in {hist}")
            keep(metrics, copy=bool(kept_rows))
            if kept_rows:
                out = io.StringIO()
                w = csv.DictWriter(out, fieldnames=fields, restval="")
                w.writeheader()
                w.writerows(kept_rows)
                _atomic_write(metrics, out.getvalue())
    saes = run_dir / "saes"
    if saes.is_dir() and start_step < total_steps:
        keep(saes, copy=False)
        log(f"note: the previous dictionary in {saes} is kept in {hist / 'saes'}")
    summary = run_dir / "summary.json"
    if summary.exists() and start_step < total_steps:
        keep(summary, copy=False)
    if kept:
        _atomic_write(hist / "README.txt", f"Replaced by the run started {stamp()}: "
                      f"{', '.join(kept)} as they were before.\n")
        return hist
    return None


def _only_eval(row: dict) -> bool:
    return all(k == "step" or k.startswith("eval_") or v in ("", None) for k, v in row.items())


__all__ = ["Admission", "RunDirError", "RunLock", "accept", "acquire_lock", "admit",
           "config_diff", "move_run_aside", "read_lock"]

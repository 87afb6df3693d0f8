"""Orbax checkpoints of a training run: exact resume after a crash or preemption.

``RunCheckpointer(cfg, trainer)`` implements the loop's ``Checkpointer`` protocol with an
Orbax ``CheckpointManager`` in ``<run_dir>/checkpoints``:

- ``save(step, states, data_state)`` writes asynchronously every ``checkpoint.every_steps``
  steps (``force=True`` always writes: the final save), keeping the last ``checkpoint.keep``.
  One checkpoint holds four items: ``states`` (every hook's TrainState: SAE params,
  norm_scale, optimizer state, step, fired_ago, rng), ``data`` (each process's
  ``source.state()``), ``config`` (the resolved RunConfig) and ``meta`` (SAE specs and a
  fingerprint of every array, to tell a damaged checkpoint from a good one).
- ``restore(template)`` loads the newest checkpoint that is complete and intact onto the
  shardings that ``template`` carries (so a run saved on mesh (8, 1) resumes on (2, 4)).
  A damaged newest checkpoint is reported, moved to ``checkpoints_corrupt/`` and skipped in
  favour of the previous one; a checkpoint of a different SAE (d_in, d_sae, architecture,
  hooks) is an error that names the difference.
- SIGTERM (how Colab / TPU preemption arrives) sets a flag; ``stop_requested()`` tells the
  loop to save and stop at the end of the current step. The checkpointer is the one owner of
  the handler: installed when it is made, the previous one put back by ``close()``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae.config import RunConfig, to_dict
from jsae.errors import JsaeError
from jsae.fileio import write_text
from jsae.sae.archs import get_arch
from jsae.sae.spec import spec_to_dict
from jsae.train.divergence import TrainingDiverged

ITEMS = ("states", "data", "config", "meta")
FORMAT = "jsae-checkpoint-v1"
# Written beside a checkpoint once it is complete: every file and its size, so that a
# truncated or deleted file is found before Orbax reads anything.
LISTING = "jsae_files.json"
# Spec fields that must agree for a checkpoint to fit the run.
_SHAPE_FIELDS = ("architecture", "d_in", "d_sae")


class CheckpointMismatchError(JsaeError, ValueError):
    """The checkpoint in the run directory belongs to a different SAE than the config."""


class CorruptCheckpointError(JsaeError, RuntimeError):
    """A checkpoint whose files are missing, truncated or altered."""


class CheckpointWriteError(JsaeError, OSError):
    """A checkpoint that cannot be written (permissions, a full or read-only disk)."""


# ---- fingerprints ---------------------------------------------------------------------


def _leaf_hash(x: jax.Array) -> jax.Array:
    """Order-independent uint32 hash of an array's bits (same on every mesh)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = x.dtype.itemsize * 8
    if bits < 32:
        u = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16}[bits]).astype(jnp.uint32)
    elif bits == 32:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:  # 64-bit: split into two uint32 words
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    u = u.reshape(-1)
    pos = jnp.arange(u.shape[0], dtype=jnp.uint32)
    # Position-weighted sums mod 2^32: exact in any reduction order, so mesh-independent.
    return jnp.sum(u * (pos * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32) ^ jnp.sum(
        u, dtype=jnp.uint32
    )


@jax.jit
def _tree_hashes(tree) -> list[jax.Array]:
    return [_leaf_hash(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> list[int]:
    """One uint32 per array leaf of ``tree`` (exact, independent of sharding)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return []
    return [int(h) for h in jax.device_get(_tree_hashes(tree))]


def _json_sha256(obj) -> str:
    """A hash of JSON data as Orbax writes and reads it back (key order and floats canonical)."""
    import hashlib

    text = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@jax.jit
def _all_finite(tree) -> jax.Array:
    ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(ok)) if ok else jnp.asarray(True)


# ---- multi-process data state ---------------------------------------------------------


def _gather_json(obj: dict) -> list[dict]:
    """Every process's JSON-able ``obj``, in process order (one element on one host)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    buf = np.zeros((n,), np.uint8)
    buf[: raw.size] = raw
    allb = np.asarray(multihost_utils.process_allgather(buf[None], tiled=True))
    return [json.loads(bytes(b).rstrip(b"\0").decode()) for b in allb]


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


# ---- the checkpointer -----------------------------------------------------------------


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb, key = a.get(k), b.get(k), f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, key + ".")
        elif va != vb:
            out.append((key, va, vb))
    return out


def _spec_dict(spec) -> dict:
    return spec_to_dict(spec)


class RunCheckpointer:
    """Orbax checkpoints for one run directory (see the module docstring)."""

    def __init__(self, cfg: RunConfig, trainer=None, *, install_signal_handler: bool = True,
                 directory: str | Path | None = None, log_fn=print):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.cfg = cfg
        self.every = cfg.checkpoint.every_steps
        self.directory = Path(directory or Path(cfg.run_dir) / "checkpoints").absolute()
        self.specs = dict(trainer.specs) if trainer is not None else {}
        self.hooks = list(trainer.hooks) if trainer is not None else list(self.specs)
        self._log = log_fn
        self._last_saved: int | None = None
        self._pending: int | None = None  # saved step whose file listing is not written yet
        self._stop = threading.Event()
        self._interrupted = False
        self._prev_handler = self._prev_int = None
        self._check_shared_directory()
        self._check_writable()
        self._mngr = self._new_manager()
        if install_signal_handler:
            self._install_sigterm()

    def _check_shared_directory(self) -> None:
        """On several hosts, fail at once unless every host sees the same checkpoint folder.

        Orbax writes each host's shards into the one directory and host 0 finalises it, so
        local per-host disks would lose shards only at the first save, hours in.  Host 0
        writes a token, every host must read it back (a collective)."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        marker = self.directory / ".shared-check"
        token = _gather_json({"t": os.urandom(8).hex()})[0]["t"]  # host 0's token, everywhere
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        multihost_utils.sync_global_devices("jsae checkpoint directory check")
        try:
            seen = marker.read_text() == token
        except OSError:
            seen = False
        missing = [i for i, ok in enumerate(_gather_json({"ok": seen})) if not ok["ok"]]
        multihost_utils.sync_global_devices("jsae checkpoint directory checked")
        if jax.process_index() == 0:
            marker.unlink(missing_ok=True)
        if missing:
            raise RuntimeError(
                f"checkpoint directory {self.directory} is not shared by all hosts (processes "
                f"{missing} do not see what process 0 wrote there). Multi-host checkpoints need "
                "one folder every host sees (a shared mount such as gcsfuse or NFS): set run_dir "
                "to it, or train with --no-checkpoint"
            )

    def _check_writable(self) -> None:
        """Fail before training, in one line, when the checkpoint folder cannot be written (a
        read-only or full disk, another user's folder), not at the first save in a thread."""
        if jax.process_index() != 0:
            return
        probe = self.directory / f".jsae-write-check-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as e:
            raise CheckpointWriteError(
                f"checkpoint folder {self.directory} cannot be written ({e.strerror or e}); "
                "free the disk or fix its permissions, choose another run_dir, or train with "
                "--no-checkpoint") from None

    def _new_manager(self):
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.checkpoint.keep,
            save_interval_steps=1,  # the decision is ours (`_due`), made the same on every host
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a crash interrupted
            enable_should_save_is_saving_in_progress_check=False,
        )
        return ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=ITEMS,
            item_handlers={
                "states": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    # ---- SIGTERM ----------------------------------------------------------------------
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._stop.set()

        def on_ctrl_c(signum, frame):
            # The first Ctrl-C stops at the next step boundary, with a checkpoint, and the run
            # then ends as an interrupt (exit 130): a KeyboardInterrupt raised inside an Orbax
            # save could leave its threads waiting forever. A second Ctrl-C interrupts at once.
            self._interrupted = True
            self._stop.set()
            signal.signal(signal.SIGINT, self._prev_int or signal.default_int_handler)
            print("Ctrl-C: stopping at the next safe point (press it again to stop at once)",
                  flush=True)

        try:
            self._prev_handler = signal.signal(signal.SIGTERM, handler)
            self._prev_int = signal.signal(signal.SIGINT, on_ctrl_c)
        except (ValueError, OSError):  # not in the main interpreter thread
            self._prev_handler = self._prev_int = None

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from Ctrl-C (SIGINT) rather than SIGTERM."""
        return self._interrupted

    def request_stop(self) -> None:
        """What SIGTERM does: ask the loop to save and stop after the current step."""
        self._stop.set()

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (a collective: every process asks)."""
        return _any_process(self._stop.is_set())

    # ---- queries ----------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    @property
    def latest_step(self) -> int | None:
        """The newest finished checkpoint (waits for a save in flight)."""
        self._finish_pending()
        return self._mngr.latest_step()

    def _finish_pending(self) -> None:
        """Wait for the save in flight, then record its files and sizes."""
        self._mngr.wait_until_finished()
        step, self._pending = self._pending, None
        d = self.directory / str(step)
        if step is None or jax.process_index() != 0 or not d.is_dir():
            return
        files = {str(f.relative_to(d)): f.stat().st_size
                 for f in sorted(d.rglob("*")) if f.is_file() and f.name != LISTING}
        write_text(d / LISTING, json.dumps(files, indent=0))

    def describe_last_good(self) -> str:
        step = self.latest_step
        if step is None:
            return "no checkpoint has been saved yet"
        return f"the last good checkpoint is step {step} in {self.directory / str(step)}"

    def _due(self, step: int) -> bool:
        return step % self.every == 0

    # ---- save -------------------------------------------------------------------------
    def save(self, step: int, states, data_state: dict | Callable[[], dict], *,
             force: bool = False) -> None:
        """Save ``step`` when it is due (``force``: always, unless just saved); a callable
        ``data_state`` (the source's ``state``) is only read for a step that is saved."""
        step = int(step)
        if not (force or self._due(step)) or self._last_saved == step:
            return
        if not bool(_all_finite(states)):
            raise TrainingDiverged(
                f"non-finite parameters or optimizer state at step {step}; not saving them. "
                f"{self.describe_last_good()}. Lower train.lr or check the input activations, "
                "then resume (jsae train restarts from that checkpoint)."
            )
        self._finish_pending()
        ocp = self._ocp
        if callable(data_state):
            data_state = data_state()
        data = {"processes": _gather_json(data_state)}
        meta = {
            "format": FORMAT,
            "step": step,
            "hooks": self.hooks or list(states),
            "specs": {h: _spec_dict(s) for h, s in self.specs.items()},
            "fingerprint": fingerprint(states),
            "data_sha256": _json_sha256(data),
            "jax_process_count": jax.process_count(),
        }
        args = ocp.args.Composite(
            states=ocp.args.StandardSave(states),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(to_dict(self.cfg)),
            meta=ocp.args.JsonSave(meta),
        )
        self._mngr.save(step, args=args, force=True)
        self._last_saved = self._pending = step

    def wait(self) -> None:
        self._finish_pending()

    # ---- restore ----------------------------------------------------------------------
    def _read_json(self, step: int, item: str) -> dict:
        path = self.directory / str(step) / item / "metadata"
        if not path.exists():
            raise CorruptCheckpointError(f"{path} is missing")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path} is not valid JSON ({e})") from e

    def check_fits(self, step: int) -> dict:
        """The checkpoint's meta; raises CheckpointMismatchError if it is another SAE."""
        meta = self._read_json(step, "meta")
        if meta.get("format") != FORMAT:
            raise CorruptCheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        where = self.directory / str(step)
        saved_hooks = list(meta.get("hooks", []))
        if self.hooks and saved_hooks != self.hooks:
            raise CheckpointMismatchError(
                f"checkpoint {where} trains hooks {saved_hooks} but the config asks for "
                f"{self.hooks}; use another run_dir or `jsae train --fresh` to start over"
            )
        for h, spec in self.specs.items():
            saved = meta.get("specs", {}).get(h, {})
            diffs = [
                f"{f}={saved.get(f)!r} in the checkpoint but {getattr(spec, f)!r} in the config"
                for f in _SHAPE_FIELDS if saved.get(f) != getattr(spec, f)
            ]
            k = get_arch(spec.architecture).code_k(spec)
            if k is not None and saved.get("k") != k:
                diffs.append(f"k={saved.get('k')!r} in the checkpoint but {k!r} in the config")
            if diffs:
                raise CheckpointMismatchError(
                    f"checkpoint {where} does not fit the config for hook {h!r}: "
                    + "; ".join(diffs)
                    + ". Use another run_dir or `jsae train --fresh` to start over."
                )
        return meta

    def _restore_step(self, step: int, template) -> tuple[Any, dict, dict]:
        ocp = self._ocp
        meta = self.check_fits(step)
        listing = self.directory / str(step) / LISTING
        if listing.exists():  # absent only if the run died right after the save finished
            for rel, size in json.loads(listing.read_text()).items():
                f = self.directory / str(step) / rel
                if not f.exists():
                    raise CorruptCheckpointError(f"{f} is missing")
                if f.stat().st_size != size:
                    raise CorruptCheckpointError(
                        f"{f} has {f.stat().st_size} bytes, {size} were written")
        states_dir = self.directory / str(step) / "states"
        for name in ("_METADATA", "manifest.ocdbt"):
            if not (states_dir / name).exists():
                raise CorruptCheckpointError(f"{states_dir / name} is missing")
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                states=ocp.args.StandardRestore(template),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        states = out["states"]
        if fingerprint(states) != list(meta["fingerprint"]):
            raise CorruptCheckpointError("array contents do not match the saved fingerprint")
        if "data_sha256" in meta and _json_sha256(out["data"]) != meta["data_sha256"]:
            raise CorruptCheckpointError("the saved data position does not match its fingerprint")
        procs = out["data"]["processes"]
        if not isinstance(procs, list) or not all(isinstance(p, dict) for p in procs):
            raise CorruptCheckpointError("the saved data position is not a list of objects")
        if len(procs) != jax.process_count():
            raise CheckpointMismatchError(
                f"checkpoint step {step} was written by {len(procs)} processes but this run has "
                f"{jax.process_count()}; the data position cannot be split differently"
            )
        return states, procs[jax.process_index()], meta

    def _note_config_changes(self, step: int) -> None:
        try:
            saved = self._read_json(step, "config")
        except CorruptCheckpointError:
            return
        diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in _dict_diff(saved, to_dict(self.cfg))
                 if k != "run_dir"]
        if diffs:
            more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
            self._log("note: config changed since checkpoint step "
                      f"{step}: {'; '.join(diffs[:8])}{more}")

    def _quarantine(self, step: int) -> Path | None:
        src = self.directory / str(step)
        if jax.process_index() != 0 or not src.exists():
            return None
        dst_root = self.directory.parent / "checkpoints_corrupt"
        dst_root.mkdir(parents=True, exist_ok=True)
        dst = dst_root / str(step)
        n = 1
        while dst.exists():
            dst, n = dst_root / f"{step}.{n}", n + 1
        shutil.move(str(src), str(dst))
        return dst

    def restore(self, template):
        """(states, data_state) from the newest good checkpoint, or None when there is none."""
        self._finish_pending()
        self._mngr.reload()
        steps = sorted(self._mngr.all_steps(), reverse=True)
        bad: list[int] = []
        result = None
        for step in steps:
            try:
                states, data_state, _ = self._restore_step(step, template)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self._log(f"warning: checkpoint step {step} in {self.directory} is damaged "
                          f"({msg}); trying the previous one")
                bad.append(step)
                continue
            result = (states, data_state)
            self._note_config_changes(step)
            break
        for step in bad:
            moved = self._quarantine(step)
            if moved is not None:
                self._log(f"moved damaged checkpoint step {step} to {moved}")
        if bad:
            self._mngr.reload()
        if result is None:
            if bad:
                self._log("warning: no intact checkpoint left; starting from scratch")
            return None
        self._last_saved = int(max(self._mngr.all_steps() or [0]))
        return result

    # ---- shutdown ---------------------------------------------------------------------
    def close(self) -> None:
        """Finish the save in flight and stop Orbax's threads; a save that failed in the
        background is raised here as one :class:`CheckpointWriteError` line (after the
        threads are stopped, so they cannot keep the process alive)."""
        try:
            try:
                self._finish_pending()
            finally:
                try:
                    self._mngr.close()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
        except OSError as e:
            raise CheckpointWriteError(f"saving a checkpoint in {self.directory} failed: "
                                       f"{e.strerror or e}") from e
        finally:
            for sig, prev in ((signal.SIGTERM, self._prev_handler), (signal.SIGINT, self._prev_int)):
                if prev is not None:
                    try:
                        signal.signal(sig, prev)
                    except (ValueError, OSError):
                        pass
            self._prev_handler = self._prev_int = None


# ---- reading a run's checkpoint outside training ----------------------------------------


def latest_checkpoint(run_dir: str | Path) -> int | None:
    """Step number of the newest finished checkpoint in ``run_dir`` (None if there is none)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return None
    steps = [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()
             and (p / "meta").exists()]
    return max(steps) if steps else None


def read_checkpoint(run_dir: str | Path, step: int | None = None) -> dict:
    """A run's checkpoint as plain data: ``{"step", "states", "data", "meta", "config"}``.

    ``states`` is a nested dict of numpy arrays (hook -> TrainState fields), read without a
    template, for export and inspection; ``step=None`` takes the newest checkpoint.
    """
    import orbax.checkpoint as ocp

    d = Path(run_dir) / "checkpoints"
    if step is None:
        step = latest_checkpoint(run_dir)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {d}")
    root = (d / str(step)).absolute()
    out = {"step": int(step)}
    for item in ("data", "meta", "config"):
        out[item] = json.loads((root / item / "metadata").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        out["states"] = jax.tree.map(np.asarray, ckptr.restore(root / "states"))
    return out


__all__ = [
    "CheckpointMismatchError", "CorruptCheckpointError", "RunCheckpointer", "fingerprint",
    "latest_checkpoint", "read_checkpoint",
]

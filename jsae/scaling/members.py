"""Runs and SAE folders read as members of one comparison: dictionaries of different sizes on
one hook of one model (`jsae scaling`, `jsae families`).

A member is a run directory (its dictionary for ``hook``; the newest SAE as `jsae.runs` picks
it) or an SAE folder (``RUN/saes/<hook>/``, or a family member's ``saes/<hook>/<name>/``); a
family's run directory stands for all its members' folders (on ``hook``).
Its held-out points (``eval.at_tokens``) come from the dictionary's ``sae.json`` metadata
(``scaling``), written by `jsae.train.run.Run.finish`, so a folder carries its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jsae.errors import BadInput
from jsae.runs import is_run, run_hooks, sae_dirname, split_member
from jsae.sae.io import read_spec
from jsae.sae.spec import SAESpec


@dataclasses.dataclass
class Member:
    """One dictionary: where it is, what it reads and its shape; ``folder`` is its SAE folder
    (None for a run read from a checkpoint only)."""

    path: Path
    hook: str
    model: str | None
    spec: SAESpec
    meta: dict
    folder: Path | None

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    def load(self):
        """(SAE, info) of this member (`jsae.runs.sae_from_run` for a run)."""
        from jsae.runs import sae_from_run
        from jsae.sae.io import load_sae

        if is_run(self.path):
            return sae_from_run(self.path, self.hook)
        return load_sae(self.path)


def read_member(path: str | Path, hook: str | None = None) -> Member:
    """The member at ``path`` (a run directory or an SAE folder); BadInput in one line when
    it is neither, or when a run trains several hooks and ``hook`` names none of them."""
    p = Path(path)
    if (p / "sae.json").is_file():
        spec, meta = read_spec(p)
        h = meta.get("hook_name") if isinstance(meta.get("hook_name"), str) else None
        if h is None:
            raise BadInput(f"{p / 'sae.json'}: field 'metadata.hook_name' is missing; the "
                           "dictionaries' hooks cannot be compared")
        return Member(p, h, meta.get("model_name"), spec, meta, p)
    if not is_run(p):
        raise BadInput(f"{p} is neither a jsae run directory nor an SAE folder (no saes/, "
                       "checkpoints/ or sae.json)")
    hooks = run_hooks(p)
    if hook is None and len(hooks) > 1:
        raise BadInput(f"{p} trains several dictionaries ({', '.join(hooks)}); name one with "
                       "--hook")
    h = hook or hooks[0]
    if h not in hooks:
        raise BadInput(f"{p}: no dictionary for hook {h!r}; it has {', '.join(hooks)}")
    folder = p / "saes" / sae_dirname(h)
    if (folder / "sae.json").is_file():
        spec, meta = read_spec(folder)
        return Member(p, split_member(h)[0], meta.get("model_name"), spec, meta, folder)
    from jsae.runs import sae_from_checkpoint

    sae, info = sae_from_checkpoint(p, h)
    from jsae.runs import model_section

    return Member(p, split_member(h)[0], model_section(p).get("name"), sae.spec, info, None)


def _family_folders(path, hook: str | None) -> list:
    """A family's run directory: its members' final folders (those on ``hook``, when given);
    any other path: itself."""
    p = Path(path)
    if (p / "sae.json").is_file() or not is_run(p):
        return [path]
    try:
        keys = run_hooks(p)
    except (OSError, ValueError, KeyError):
        return [path]
    folders = [p / "saes" / sae_dirname(k) for k in keys
               if split_member(k)[1] is not None and (hook is None or split_member(k)[0] == hook)]
    return [f for f in folders if (f / "sae.json").is_file()] or [path]


def read_members(paths, hook: str | None = None, *, at_least: int = 2) -> list[Member]:
    """Members at ``paths``, checked to be comparable (one hook, one model, one width d_in, one
    architecture's kind of hooks), sorted by dictionary size (stable). BadInput otherwise."""
    paths = [q for p in paths for q in _family_folders(p, hook)]
    if len(paths) < at_least:
        raise BadInput(f"give at least {at_least} runs or SAE folders (got {len(paths)}): the "
                       "comparison is across dictionary sizes")
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise BadInput("the same run or SAE folder is given twice")
    members = [read_member(p, hook) for p in paths]
    first = members[0]
    for m in members[1:]:
        for what, a, b in (("hook", first.hook, m.hook), ("model", first.model, m.model),
                           ("d_in", first.spec.d_in, m.spec.d_in)):
            if a != b:
                raise BadInput(f"{m.path} is on {what} {b!r} but {first.path} on {a!r}: compare "
                               "dictionaries trained on the same hook of the same model")
    return sorted(members, key=lambda m: m.d_sae)


__all__ = ["Member", "read_member", "read_members"]

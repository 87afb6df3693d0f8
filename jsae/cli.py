"""`jsae` command line: one subcommand per module in `jsae.commands`.

Each command module defines ``add_parser(subparsers)`` (cheap, no jax import) and
``run(args) -> int``; heavy imports happen inside ``run`` so ``jsae --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import jsae.commands as _commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"jsae.commands.{info.name}")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (not the usage block, then the line)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jsae",
        description="Sparse autoencoders for language-model interpretability, in JAX.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error (also of expected ones)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


# Errors a user can cause: one line and exit code 2. Anything else is a bug: traceback.
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def _is_expected(e: BaseException) -> bool:
    """A user's error or the machine's (a full disk, a folder that cannot be written), not a bug."""
    from jsae.errors import JsaeError

    return isinstance(e, (JsaeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError)) or (isinstance(e, OSError) and e.errno is not None)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not str(e).strip(" ()"):
        return type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        what = {28: "the disk is full", 122: "the disk quota is exceeded"}.get(e.errno, e.strerror)
        return f"cannot write or read {where}: {what}"
    msg = " ".join(str(e).split()) or type(e).__name__
    if type(e).__name__ == "ConfigError":
        msg = f"config error: {msg}"
    return msg


def _quiet_background_loggers() -> None:
    """Orbax logs a background save's failure with its traceback through absl; the CLI says it
    once, in one line, when the error reaches the command."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)


def _resume_hint(args) -> str:
    if args.command == "train":
        return "; run the same command again to resume from the last checkpoint"
    if args.command == "harvest":
        return "; run the same command again to resume the harvest"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    if not args.debug:
        _quiet_background_loggers()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"jsae {args.command}: interrupted (Ctrl-C){_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug or not _is_expected(e):
            raise
        print(f"jsae {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def entry() -> None:
    """The ``jsae`` console script: :func:`main`, then exit even if a library's background
    thread (an Orbax save that failed, a prefetcher) is still alive, so a job script waiting
    on a failed or interrupted command is never kept waiting."""
    import os
    import threading

    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

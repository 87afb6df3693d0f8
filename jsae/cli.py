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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def _is_expected(e: BaseException) -> bool:
    from jsae.errors import JsaeError

    return isinstance(e, (JsaeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except Exception as e:
        if args.debug or not _is_expected(e):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if type(e).__name__ == "ConfigError":
            msg = f"config error: {msg}"
        print(f"jsae {args.command}: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

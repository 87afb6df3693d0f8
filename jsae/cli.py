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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from jsae.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"jsae {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

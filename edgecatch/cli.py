"""The `edgecatch` command line.

Subcommands live in small modules that each expose `register(subparsers)`; this module only wires
them together and turns expected failures into a message and an exit code (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

# Each module adds its subcommands; its handlers return an exit code.
SUBCOMMAND_MODULES = [
    "edgecatch.policy_cli",
    "edgecatch.integrations.triton.cli",
    "edgecatch.delivery.cli",
]


class CommandError(Exception):
    """An expected failure: printed as `edgecatch: <message>` with exit code 1 (2 for usage)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecatch",
        description="Collect the images your vision model struggles with, for labeling.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _version() -> str:
    from edgecatch import __version__

    return f"edgecatch {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"edgecatch: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgecatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgecatch replay ... | head`
        return 0

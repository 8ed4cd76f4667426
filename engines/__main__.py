"""`python -m engines SUBCOMMAND ...`: one dispatcher, one table of subcommands.

Each subcommand lives in its own module and gives two functions: `add_arguments(parser)` and `run(args) -> int`
(the exit code). Adding one (build, check) is one import and one line in SUBCOMMANDS; errors a user can
cause are UserErrors, turned into one line and exit code 2 by contract.cli.run (a traceback with --debug).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from contract.cli import ArgumentParser, run


@dataclass(frozen=True)
class Subcommand:
    help: str  # one line, shown by `python -m engines --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _subcommands() -> dict[str, Subcommand]:
    """The table. Modules are imported here, not at the top, so a broken one cannot hide the others' help."""
    from engines import build, check, lint

    return {
        "lint": Subcommand("check every graph of an export against TensorRT's documented ONNX support "
                           "(runs anywhere; exit 1 when TensorRT would reject a graph)",
                           lint.add_arguments, lint.run),
        "build": Subcommand("build one TensorRT engine per graph into EXPORT_DIR/engines (needs tensorrt and a GPU; "
                            "up-to-date engines are kept)", build.add_arguments, build.run),
        "check": Subcommand("compare every engine with ONNX Runtime on real photos through Polygraphy (max/mean "
                            "errors, top-k as sets)", check.add_arguments, check.run),
    }


def build_parser(subcommands: dict[str, Subcommand]) -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m engines",
        description="TensorRT engines from a prunevlm export directory.",
        epilog="Run `python -m engines SUBCOMMAND --help` for a subcommand's options.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, sub in subcommands.items():
        sub_parser = commands.add_parser(name, help=sub.help, description=sub.help, parents=[common])
        sub.add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    subcommands = _subcommands()
    args = build_parser(subcommands).parse_args(argv)
    return run(lambda: subcommands[args.command].run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

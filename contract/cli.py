"""What both command lines share: one-line errors and exit code 2 for anything the user got wrong."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from contract.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (`error: ...`, exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run(body: Callable[[], int], debug: bool) -> int:
    """Run a CLI body: a UserError becomes one line on stderr and exit code 2 (a traceback with --debug)."""
    try:
        return body()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

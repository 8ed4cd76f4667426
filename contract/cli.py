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
        # One line whatever the message holds (a path with a newline, a library's multi-line text).
        print("error: " + " ".join(str(exc).split("\n")).strip(), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP while writing (contract.files.Terminated)
        print("interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)

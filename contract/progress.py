"""Progress lines for long steps, one format for every command: `[  12.3s] exporting llm graph ...`,
then `...: done in 4.0s`. On stderr, so stdout stays for results (tables, JSON, answers)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Progress:
    def __init__(self, stream=None, verbose: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose  # let the tools a step runs print their own logs
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        began = time.perf_counter()
        self.say(f"{text} ...")
        yield
        self.say(f"{text}: done in {time.perf_counter() - began:.1f}s")

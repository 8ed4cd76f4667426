"""Helpers the test modules share: the command lines as a user runs them and the one-line-error checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is in the picture?",
    "Describe the image in one sentence.",
    "Is there a person here? Answer yes or no, then explain why.",
]


def cli(module: str, *args: object, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` as a user runs it (PYTHONPATH names the checkout, so any cwd works)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )


def assert_refused(run: subprocess.CompletedProcess, *named: str) -> str:
    """Exit code 2 and one stderr line "error: ..." containing every string in `named`; returns the line."""
    assert "Traceback" not in run.stderr, f"traceback instead of an error line:\n{run.stderr}"
    assert run.returncode == 2, f"exit code {run.returncode}, expected 2; stderr:\n{run.stderr}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{run.stderr}"
    for text in named:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def assert_one_line(error: pytest.ExceptionInfo, *named: str) -> None:
    message = str(error.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for text in named:
        assert text in message, f"{text!r} not in {message!r}"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to check that nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary directories the exporter builds in (`.NAME.partial-*`) or moves an old export to (`.NAME.old-*`)."""
    return sorted(p.name for p in parent.glob(".*") if ".partial-" in p.name or ".old-" in p.name)


def run_main(module: str, *args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
             monkeypatch: pytest.MonkeyPatch | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` run in this process (the module's own `main(argv)`: argparse, the one-line
    error handling and the exit code), for the many refusal cases where starting a new interpreter and
    importing torch again would cost seconds each. `cli` stays for what needs a real process."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module(f"{module}.__main__").main
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch = monkeypatch or patch
        if cwd is not None:
            patch.chdir(cwd)
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's own exits (--help, a bad flag)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
                if isinstance(exc.code, str):
                    err.write(exc.code)
    return subprocess.CompletedProcess([module, *map(str, args)], code, out.getvalue(), err.getvalue())

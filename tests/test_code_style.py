"""The code passes the linter configured in pyproject.toml ([tool.ruff]): pyflakes, pycodestyle, import order."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_check_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"ruff check found problems (fix with `ruff check --fix .`):\n{run.stdout}{run.stderr}"

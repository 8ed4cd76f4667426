"""Every registered family has its own parity test file, and the registry is complete."""

from __future__ import annotations

import ast
from pathlib import Path

from export.families import FAMILIES

TESTS = Path(__file__).resolve().parent / "export"


def test_every_family_has_a_parity_test():
    for name in FAMILIES:
        path = TESTS / f"test_{name.replace('-', '_')}_parity.py"
        assert path.is_file(), f"family {name!r} has no parity test file {path.name}"
        tree = ast.parse(path.read_text())
        tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        source = path.read_text()
        assert tests, f"{path.name} defines no test"
        assert ".generate(" in source, f"{path.name} never compares against a generate() reference"


def test_family_modules_provide_the_protocol():
    needed = ("NAME", "DEFAULT_MODEL", "SYNTHETIC", "LAYOUTS", "LAYOUT_HELP", "KEEP_HELP", "default_layout",
              "read_config", "method_spec",
              "load", "graphs", "decoder", "modalities")
    for name, module in FAMILIES.items():
        missing = [attr for attr in needed if not hasattr(module, attr)]
        assert not missing, f"family {name!r} lacks {missing}"
        assert module.NAME == name
        assert "tiny" in module.SYNTHETIC, f"family {name!r} has no built-in tiny model for tests and demos"

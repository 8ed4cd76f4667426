"""The README's code runs as written: every ```python block, and every `python -m MODULE` it shows exists.

The Python blocks run in order in one namespace, in a working directory laid out as `bash scripts/demo.sh`
leaves it (`exports/llava15-k32-tiny`, `exports/cat.jpg`), on the tiny model's export.
"""

from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image

from tests.helpers import ROOT, cli

README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
MODULES = sorted(set(re.findall(r"python3? -m ([a-z_.]+)", README)) - {"pip", "pytest"})


def test_readme_has_python_samples():
    assert PYTHON_BLOCKS, "README.md has no ```python block"


def test_python_samples_run_as_written(tiny_export, photos, tmp_path, monkeypatch, capsys):
    exports = tmp_path / "exports"
    exports.mkdir()
    shutil.copytree(tiny_export(32), exports / "llava15-k32-tiny")
    Image.fromarray(photos["chelsea"]).save(exports / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(PYTHON_BLOCKS):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "time_to_first_token_s" in printed  # the sample printed its timings, so it ran to the end


@pytest.mark.parametrize("module", MODULES)
def test_documented_commands_exist(module):
    run = cli(module, "--help")
    assert run.returncode == 0 and "usage:" in run.stdout, f"python -m {module} --help failed:\n{run.stderr}"


def test_commands_in_readme_use_flags_their_help_lists():
    """Each `python -m MODULE ... --flag` in the README names a flag that MODULE's --help lists."""
    helps = {m: cli(m, "--help").stdout for m in MODULES}
    commands = re.split(r"&&|;|\|", README)
    for line in (m for piece in commands for m in re.findall(r"python3? -m ([a-z_.]+)([^\n`]*)", piece)):
        module, rest = line
        if module not in helps:
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            sub_help = helps[module]
            if flag not in sub_help:  # a subcommand's flag: look in the subcommand's help
                words = rest.split()
                sub = words[0] if words and not words[0].startswith("-") else None
                sub_help = cli(module, sub, "--help").stdout if sub else ""
            assert flag in sub_help, f"README: `python -m {module}{rest}` uses {flag}, which --help does not list"

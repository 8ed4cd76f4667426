"""The runtime imports neither torch nor transformers, also while it runs a whole query."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["fastervlm", "feather"])
def test_runtime_query_imports_no_torch(method, export_dir, tmp_path):
    export_dir = export_dir("llava15", 32) if method == "fastervlm" else export_dir("llava15", None, method=method)
    script = f"""
import sys
import numpy as np
from runtime.pipeline import Pipeline
import runtime.__main__, runtime.visualize
pipe = Pipeline.load({str(export_dir)!r})
result = pipe.generate(np.full((64, 80, 3), 127, np.uint8), "What is this?", max_new_tokens=3)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'export'))
print('HEAVY', heavy)
assert len(result.token_ids) >= 1
assert len(result.kept_stages) == ({2 if method == 'feather' else 0})
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_contract_engines_and_calibration_import_no_torch(tiny_export):
    """engines/ and calibration/ depend on the contract and the runtime, never on the exporter: `engines lint`
    runs on a Jetson without torch, and calibration needs torch only inside ModelOpt's own call."""
    export_dir = tiny_export(32)
    script = f"""
import sys, pkgutil, importlib
import contract, engines, calibration
for package in (contract, engines, calibration):
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{{package.__name__}}.{{module.name}}")
from engines import lint
from engines.plan import BuildOptions, graph_sizes
from contract.manifest import Manifest
assert not [f for f in lint.lint({str(export_dir)!r}) if f.severity == "error"]
graph_sizes(Manifest.read({str(export_dir)!r}), BuildOptions({str(export_dir)!r}))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'export'))
print('HEAVY', heavy)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout

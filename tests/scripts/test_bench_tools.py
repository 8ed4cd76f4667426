"""The measuring tools issue 12's README findings come from: `scripts/ort_kernel_probe.py` (ONNX Runtime's
kernels on one-node graphs against numpy) and `scripts/bench_llm.py --profile`'s breakdown of a profile."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_probe_reports_every_case_and_checks_against_numpy():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _script("ort_kernel_probe").main(["--repeats", "3"]) == 0
    lines = out.getvalue().splitlines()
    rotary = [line for line in lines if line.startswith("GroupQueryAttention do_rotary")]
    assert len(rotary) == 4 and all("rotates with " in line for line in rotary), rotary
    # A decode step with a past is where the operator honours position_ids (what `--target onnxruntime` could use)
    assert rotary[3].endswith("rotates with the given positions"), rotary[3]
    errors = {}
    for line in lines:
        found = re.match(r"MatMulNBits .* zero points (\w+) *, accuracy level (\d), +(\d+) tokens?.*max error ([0-9.e+-]+)", line)
        if found:
            errors[found.group(1), int(found.group(2)), int(found.group(3))] = float(found.group(4))
    assert len(errors) == 12, lines
    # Every form computes what numpy does: level 4 within its int8 activation rounding, the others to fp32
    assert all(e < (2e-2 if level == 4 and zeros != "float" else 1e-5) for (zeros, level, _), e in errors.items()), errors
    assert sum(line.startswith("MatMul fp32") for line in lines) == 2


@pytest.mark.parametrize("argv, named", [(["--repeats", "0"], "--repeats 0"), (["--threads", "100000"], "--threads 100000"),
                                         (["--threads", "two"], "--threads")])
def test_kernel_probe_refuses_bad_arguments(argv, named, capsys):
    with pytest.raises(SystemExit) as raised:
        _script("ort_kernel_probe").main(argv)
    assert raised.value.code == 2 and named in capsys.readouterr().err


def _event(name, ts, dur, op=None):
    event = {"name": name, "ts": ts, "dur": dur, "cat": "Node" if op else "Session"}
    if op:
        event["args"] = {"op_name": op}
    return event


def test_profile_breakdown_counts_decode_steps_only(tmp_path):
    """The first run is the prompt and is left out; kernel times are per decode step, per operator type."""
    events = [
        _event("model_run", 0, 1000), _event("a_kernel_time", 10, 900, "MatMul"),  # the prompt
        _event("model_run", 2000, 100), _event("b_kernel_time", 2010, 40, "MatMul"),
        _event("c_kernel_time", 2060, 20, "Add"), _event("c_fence_before", 2060, 5, "Add"),
        _event("model_run", 3000, 120), _event("d_kernel_time", 3010, 60, "MatMul"),
        _event("e_kernel_time", 3080, 40, "Add"),
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    bench = _script("bench_llm")
    profile = bench.decode_profile(path)
    assert profile["steps"] == 2 and profile["operators"] == 2
    assert profile["step_ms"] == pytest.approx(0.110)
    assert profile["kernel_ms"] == pytest.approx({"MatMul": 0.050, "Add": 0.030})
    (line,) = bench.profile_lines("variant", profile)
    assert line.startswith("variant: decode step 0.11 ms (median of 2), 2 operators, kernels 0.08 ms: MatMul 0.05, Add 0.03")

"""A checkpoint directory whose files are broken is refused with one line, and nothing is written.

Each case damages a copy of the built-in tiny checkpoint the way a failed download or a bad copy does.
Through the API (one process, fast) for every case; through the command line for one.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from contract.errors import ExportError
from export.api import Progress, run
from export.spec import ExportOptions
from tests.helpers import assert_refused, cli, leftovers

WEIGHTS = "model.safetensors"


def _truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garbage(d: Path) -> None:
    (d / WEIGHTS).write_bytes(b"\x00" * 4096)


def _missing_tensor(d: Path) -> None:
    tensors = load_file(d / WEIGHTS)
    tensors.pop(sorted(k for k in tensors if "layers.0" in k)[0])
    save_file(tensors, d / WEIGHTS)


def _wrong_shape(d: Path) -> None:
    tensors = load_file(d / WEIGHTS)
    name = sorted(k for k in tensors if k.endswith("lm_head.weight"))[0]
    tensors[name] = tensors[name][:-1]
    save_file(tensors, d / WEIGHTS)


def _missing_shard(d: Path) -> None:
    (d / WEIGHTS).rename(d / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _config_field(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["text_config"] = 5
    (d / "config.json").write_text(json.dumps(config))


CASES = {
    "truncated weights": (_truncate, ["checkpoint", "header"]),
    "garbage weights": (_garbage, ["checkpoint"]),
    "no weights": (lambda d: (d / WEIGHTS).unlink(), ["checkpoint", "model.safetensors"]),
    "missing tensor": (_missing_tensor, ["missing keys", "layers.0"]),
    "tensor of another shape": (_wrong_shape, ["shapes differ", "config.json"]),
    "missing shard": (_missing_shard, ["checkpoint", "model-00002-of-00002"]),
    "invalid config.json": (lambda d: (d / "config.json").write_text('{"model_type": "llava", '), ["config"]),
    "config field of the wrong type": (_config_field, ["config", "text_config"]),
    "corrupt tokenizer.json": (lambda d: (d / "tokenizer.json").write_text('{"version": '), ["tokenizer"]),
}


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    def make(case: str) -> Path:
        directory = tmp_path / "checkpoint"
        shutil.copytree(tiny_checkpoint, directory)
        CASES[case][0](directory)
        return directory

    return make


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_is_one_line(case, broken, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError) as error:
        run(ExportOptions("llava15", 32, model=str(broken(case)), out=out, validate=False),
            Progress(stream=io.StringIO()))
    message = str(error.value)
    assert "\n" not in message, message
    for text in CASES[case][1]:
        assert text in message, f"{text!r} not in {message!r}"
    assert not out.exists() and leftovers(tmp_path) == []


def test_broken_checkpoint_through_the_cli(broken, tmp_path):
    out = tmp_path / "out"
    run_ = cli("export", "llava15", "--keep", 32, "--model", broken("truncated weights"), "--out", out)
    lines = run_.stderr.splitlines()
    assert_refused(run_.__class__(run_.args, run_.returncode, run_.stdout, lines[-1] + "\n"), "header")
    assert not any("Traceback" in line for line in lines) and not out.exists() and leftovers(tmp_path) == []

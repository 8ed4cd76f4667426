"""trtexec commands (golden strings for TensorRT 10 and 11), name quoting, LLM profile consistency, profile tables."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.errors import InputError
from contract.manifest import GraphSpec, TensorSpec
from engines import trtexec
from engines.trtexec import Sizes, axis_ranges, graph_profile, onnx_commands

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "trtexec_profile.py"

OUT = (TensorSpec("out", "float32", ("batch", 1)),)  # a graph declares at least one output
VISION = GraphSpec("vision.onnx", (TensorSpec("pixel_values", "float32", ("batch", 3, 336, 336)),),
                   (TensorSpec("keep_indices", "int64", ("batch", 32)),))
LLM = GraphSpec(
    "llm.onnx",
    (TensorSpec("inputs_embeds", "float32", ("batch", "sequence", 8)),
     TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
     TensorSpec("position_ids", "int64", ("batch", "sequence")),
     TensorSpec("past_key_values.0.key", "float32", ("batch", 2, "past_sequence", 4)),
     TensorSpec("past_key_values.0.value", "float32", ("batch", 2, "past_sequence", 4))),
    (TensorSpec("logits", "float32", ("batch", 50)),),
)
SIZES = Sizes(batch=2, max_batch=4, seq_len=40, max_seq_len=128)

GOLDEN_10_VISION_FP16 = (
    "trtexec --onnx=/exp/vision.onnx --minShapes=pixel_values:1x3x336x336 --optShapes=pixel_values:2x3x336x336 "
    "--maxShapes=pixel_values:4x3x336x336 --shapes=pixel_values:2x3x336x336 --fp16 --saveEngine=/out/vision.plan "
    "--profilingVerbosity=detailed --exportProfile=/out/vision.profile.json --exportLayerInfo=/out/vision.layers.json "
    "--separateProfileRun"
)
_DECODE_OPT = ("inputs_embeds:2x1x8,attention_mask:2x41,position_ids:2x1,past_key_values.0.key:2x2x40x4,"
               "past_key_values.0.value:2x2x40x4")
GOLDEN_LLM_DECODE = (
    "trtexec --onnx=/exp/llm.onnx "
    "--minShapes=inputs_embeds:1x1x8,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x2x0x4,"
    "past_key_values.0.value:1x2x0x4 "
    f"--optShapes={_DECODE_OPT} "
    "--maxShapes=inputs_embeds:4x1x8,attention_mask:4x128,position_ids:4x1,past_key_values.0.key:4x2x127x4,"
    "past_key_values.0.value:4x2x127x4 "
    f"--shapes={_DECODE_OPT} {{precision}}--saveEngine=/out/llm.decode.plan --profilingVerbosity=detailed "
    "--exportProfile=/out/llm.decode.profile.json --exportLayerInfo=/out/llm.decode.layers.json --separateProfileRun"
)


def commands(major: int, precision: str = "onnx") -> dict[str, str]:
    made = onnx_commands(Path("/exp"), {"vision": VISION, "llm": LLM}, SIZES, major, Path("/out"), precision)
    return {c.name: c.shell() for c in made}


def test_golden_tensorrt_10():
    assert commands(10, "fp16")["vision"] == GOLDEN_10_VISION_FP16
    assert commands(10)["llm.decode"] == GOLDEN_LLM_DECODE.format(precision="--stronglyTyped ")
    assert list(commands(10)) == ["vision", "llm.prefill", "llm.decode"]


def test_golden_tensorrt_11_has_no_precision_flags():
    made = commands(11)
    assert made["llm.decode"] == GOLDEN_LLM_DECODE.format(precision="")
    assert made["vision"] == GOLDEN_10_VISION_FP16.replace("--fp16 ", "")
    for removed in ("--fp16", "--int8", "--best", "--stronglyTyped"):
        assert all(removed not in line for line in made.values())


@pytest.mark.parametrize("precision", ["fp16", "int8", "best"])
def test_tensorrt_11_refuses_removed_precision_flags(precision):
    assert trtexec.precision_flags(precision, 10) == [f"--{precision}"]
    with pytest.raises(InputError, match=f"--precision {precision} does not exist in TensorRT 11"):
        commands(11, precision)


@pytest.mark.parametrize("sizes", [SIZES, Sizes(), Sizes(batch=1, max_batch=1, seq_len=1, max_seq_len=2)])
@pytest.mark.parametrize("phase", trtexec.PHASES)
def test_llm_profile_keeps_total_equal_past_plus_sequence(sizes, phase):
    shapes = graph_profile(LLM, sizes, phase).shapes
    for which in range(3):  # min, opt, max
        sequence = shapes["inputs_embeds"][which][1]
        past = shapes["past_key_values.0.key"][which][2]
        assert shapes["attention_mask"][which][1] == past + sequence, (phase, which, shapes)
        assert shapes["position_ids"][which][1] == sequence
        assert shapes["past_key_values.0.value"][which] == shapes["past_key_values.0.key"][which]
    lows, opts, highs = zip(*axis_ranges(sizes, phase).values())
    assert all(lo <= opt <= hi for lo, opt, hi in zip(lows, opts, highs))
    total_max = shapes["attention_mask"][2][1]
    assert total_max == sizes.max_seq_len  # the cache never grows past the export's promise
    opt_sequence = shapes["inputs_embeds"][1][1]
    assert opt_sequence == (sizes.seq_len if phase == "prefill" else 1)


def trtexec_split(spec: str) -> dict[str, list[int]]:
    """trtexec's own reading of a shape spec (sampleOptions.cpp: splitNameAndValue, removeSingleQuotationMarks)."""
    parsed = {}
    for pair in spec.split(","):
        quoted = pair.split("'")
        if len(quoted) == 3:
            name, value = quoted[0] + quoted[1], quoted[2][1:]
        else:
            *name_parts, value = pair.split(":")
            name = ":".join(name_parts)
        parsed[name.replace("'", "")] = [int(d) for d in value.split("x")]
    return parsed


def test_names_round_trip_through_trtexecs_parser():
    names = ["past_key_values.0.key", "input:0", "a.b:c.d", "plain"]
    spec = GraphSpec("g.onnx", tuple(TensorSpec(n, "float32", ("batch", i + 1)) for i, n in enumerate(names)), OUT)
    profile = graph_profile(spec, Sizes(batch=3, max_batch=5))
    assert "past_key_values.0.key:3x1" in profile.spec(1)  # dots need no quotes
    assert "'input:0':3x2" in profile.spec(1)
    for which, batch in enumerate((1, 3, 5)):
        assert trtexec_split(profile.spec(which)) == {n: [batch, i + 1] for i, n in enumerate(names)}


def test_shell_form_of_a_quoted_name_survives_bash():
    spec = GraphSpec("g.onnx", (TensorSpec("input:0", "float32", ("batch", 3)),), OUT)
    command = onnx_commands(Path("/e"), {"g": spec}, Sizes(), 10, Path("/o"))[0]
    echoed = subprocess.run(["bash", "-c", f"printf '%s\\n' {command.shell()}"], capture_output=True, text=True)
    assert echoed.stdout.splitlines() == list(command.argv)


@pytest.mark.parametrize("name", ["a,b", "it's", "layer*"])
def test_names_trtexec_cannot_express_are_refused(name):
    spec = GraphSpec("g.onnx", (TensorSpec(name, "float32", ("batch", 3)),), OUT)
    with pytest.raises(InputError, match="rename it"):
        graph_profile(spec, Sizes()).spec(0)


@pytest.mark.parametrize("kwargs, names", [
    ({"batch": 3, "max_batch": 2}, "--batch 3"), ({"seq_len": 128, "max_seq_len": 128}, "--seq-len 128"),
    ({"seq_len": 0}, "--seq-len 0"), ({"max_seq_len": 1, "seq_len": 1}, "--max-seq-len 1"),
])
def test_sizes_are_validated(kwargs, names):
    with pytest.raises(InputError, match=names):
        Sizes(**kwargs)


@pytest.mark.parametrize("banner, version", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b10] # trtexec --version", (10, 3, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v101401] [b48] # trtexec --version", (10, 14, 1)),
    ("[TensorRT v110500]", (11, 5, 0)), ("TensorRT v8.6.1", (8, 6, 1)), ("no banner here", None),
])
def test_version_banners(banner, version):
    assert trtexec.parse_trt_version(banner) == version


def test_resolve_major():
    assert trtexec.resolve_major(None, (10, 3, 0)) == 10
    assert trtexec.resolve_major(11, None) == 11
    with pytest.raises(InputError, match="--version 11 contradicts the installed TensorRT 10.3.0"):
        trtexec.resolve_major(11, (10, 3, 0))
    with pytest.raises(InputError, match="pass --version 10 or --version 11"):
        trtexec.resolve_major(None, None)
    with pytest.raises(InputError, match="TensorRT 8.6.1 is installed"):
        trtexec.resolve_major(None, (8, 6, 1))


LAYERS = [
    {"name": "Reformatting CopyNode for Input Tensor 0 to /Conv", "timeMs": 4.0, "averageMs": 0.04, "medianMs": 0.039,
     "percentage": 4.0},
    {"name": "/layers.0/attn/MatMul + /Softmax", "timeMs": 60.0, "averageMs": 0.6, "medianMs": 0.58, "percentage": 60.0},
    {"name": "/topk/TopK", "timeMs": 6.0, "averageMs": 0.06, "percentage": 6.0},  # no medianMs: older trtexec
    {"name": "/layers.0/mlp/MatMul", "timeMs": 30.0, "averageMs": 0.3, "medianMs": 0.31, "percentage": 30.0},
]


@pytest.fixture
def profile_json(tmp_path) -> Path:
    path = tmp_path / "llm.decode.profile.json"
    path.write_text(json.dumps([{"count": 100}, *LAYERS]))
    return path


def test_profile_table(profile_json):
    profile = trtexec.read_profile(profile_json)
    assert profile.runs == 100 and len(profile.layers) == 4
    assert [t.name for t in profile.top(3)] == [LAYERS[1]["name"], LAYERS[3]["name"], LAYERS[2]["name"]]
    assert profile.top(3)[2].median_ms is None
    lines = trtexec.format_top_layers(profile, 2).splitlines()
    assert lines[0].split() == ["#", "avg", "ms", "median", "ms", "%", "layer"]
    assert lines[1].split()[:4] == ["1", "0.6000", "0.5800", "60.0"] and lines[1].endswith(LAYERS[1]["name"])
    assert lines[2].split()[:4] == ["2", "0.3000", "0.3100", "30.0"]
    assert lines[3] == "top 2 of 4 layers: 90.0% of 1.0000 ms per run (100 runs)"
    assert "-" in trtexec.format_top_layers(profile, 3).splitlines()[3].split()[2]


@pytest.mark.parametrize("data, names", [
    ({"count": 1}, "expected a list"), ([], "expected a list"), ([{"count": 3}, {"name": "x"}], "element 1"),
    ([{"count": 3}, LAYERS[0], "oops"], "element 2"),
])
def test_malformed_profiles_are_refused(data, names):
    with pytest.raises(InputError, match=names):
        trtexec.parse_profile(data, "p.json")


# ---------------------------------------------------------------- the script's command line


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("trtexec_profile_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = script.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_table_subcommand(script, profile_json, capsys):
    code, out, err = run_script(script, capsys, "table", profile_json, "--top", "1")
    assert code == 0 and err == "" and "/layers.0/attn/MatMul + /Softmax" in out and "top 1 of 4" in out


def test_commands_subcommand_on_a_real_export(script, tiny_export, capsys):
    code, out, err = run_script(script, capsys, "commands", tiny_export(32), "--version", "10", "--dry-run")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and all(line.startswith("trtexec --onnx=") for line in lines), out
    keep = 32
    assert f"--optShapes=inputs_embeds:1x{keep + 64}x" in out  # default prompt: K visual + 64 text tokens
    assert "past_key_values.0.key:1x" in out and "--stronglyTyped" in out
    code, out, err = run_script(script, capsys, "commands", tiny_export(32), "--version", "11", "--graph", "llm",
                                "--phase", "decode", "--seq-len", "10", "--max-seq-len", "64", "--dry-run")
    assert code == 0 and len(out.splitlines()) == 1 and "attention_mask:1x64" in out and "--stronglyTyped" not in out


def test_commands_for_every_block_and_select_graph(script, export_dir, tmp_path, capsys):
    """FEATHER: each decoder block gets a prefill and a decode command (its own past_key_values.i), each
    select graph one command with only its batch dynamic."""
    directory = export_dir("llava15", None, method="feather")
    code, out, err = run_script(script, capsys, "commands", directory, "--version", "10", "--dry-run",
                                "--out", tmp_path)
    engines = [line.split("--saveEngine=")[1].split()[0] for line in out.splitlines()]
    assert code == 0 and [Path(e).name for e in engines] == [
        "vision.plan", "projector.plan", "llm.0.prefill.plan", "llm.0.decode.plan", "llm.1.prefill.plan",
        "llm.1.decode.plan", "llm.2.prefill.plan", "llm.2.decode.plan", "select.image.1.plan",
        "select.image.2.plan"], out
    lines = dict(zip((Path(e).stem for e in engines), out.splitlines()))
    assert "past_key_values.1.key:1x" in lines["llm.1.decode"] and "past_key_values.0." not in lines["llm.1.decode"]
    assert "--minShapes=window_logits:1x4x576,window_valid:1x576 " in lines["select.image.1"]
    code, out, err = run_script(script, capsys, "commands", directory, "--version", "10", "--dry-run",
                                "--graph", "llm.2", "--phase", "decode", "--seq-len", "10", "--max-seq-len", "64")
    assert code == 0 and len(out.splitlines()) == 1 and "attention_mask:1x64" in out and "llm.2.decode" in out


@pytest.mark.parametrize("argv, names", [
    (["table", "/no/such.json"], "/no/such.json"),
    (["commands", "{export}", "--version", "11", "--precision", "int8"], "int8"),
    (["commands", "{export}", "--version", "10", "--graph", "nope"], "'nope'"),
    (["commands", "{export}", "--version", "10", "--batch", "0"], "--batch 0"),
    (["commands", "{export}", "--version", "12"], "12"),
    (["commands", "/no/such/export", "--version", "10"], "/no/such/export"),
    (["commands", "{export}", "--engine", "/no/engine.plan", "--graph", "llm"], "/no/engine.plan"),
])
def test_bad_input_is_one_line(script, tiny_export, capsys, argv, names):
    code, out, err = run_script(script, capsys, *(a.replace("{export}", str(tiny_export(32))) for a in argv))
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error:") and names in err, err


@pytest.mark.skipif(shutil.which("trtexec") is not None, reason="trtexec is installed: the version is detected")
def test_without_trtexec_a_version_is_required(script, tiny_export, capsys):
    code, _, err = run_script(script, capsys, "commands", tiny_export(32))
    assert code == 2 and "pass --version 10 or --version 11" in err


def test_script_runs_standalone():
    done = subprocess.run([sys.executable, str(SCRIPT), "commands", "--help"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and "--max-seq-len" in done.stdout and "--version" in done.stdout

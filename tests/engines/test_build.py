"""`python -m engines build` without TensorRT: the plan (profiles from a real export, precision per TensorRT
version), the engine metadata and its staleness checks (on an engine *file* made here: the checks read
files and JSON, not TensorRT), and the refusals. Building itself needs TensorRT and a GPU: test_tensorrt.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from contract import engine_meta
from contract.errors import InputError, ManifestError
from contract.layouts import layout_from_dict
from contract.manifest import Manifest
from contract.names import PAST, SEQUENCE, TOTAL
from engines import build as engine_build
from engines import plan as engine_plan
from engines.__main__ import main
from engines.plan import BuildError, BuildOptions

KEEP = 32


def one_line(error: pytest.ExceptionInfo, *named: str) -> None:
    message = str(error.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for text in named:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    """A private copy of the tiny K=32 export, free to be changed."""
    return Path(shutil.copytree(tiny_export(KEEP), tmp_path / "k32"))


# ------------------------------------------------------------------ profiles from a real export

def test_profiles_from_the_manifest(tiny_export):
    manifest = Manifest.read(tiny_export(KEEP))
    plans = {p.graph: p for p in engine_plan.plan(manifest, BuildOptions(tiny_export(KEEP), max_batch=2), major=10)}
    vision = plans["vision"].profiles
    assert [p.name for p in vision] == ["default"]
    assert vision[0].shapes["pixel_values"] == ((1, 3, 336, 336), (1, 3, 336, 336), (2, 3, 336, 336))
    assert set(plans["projector"].profiles[0].shapes) == {"image_features", "keep_indices"}
    assert plans["projector"].profiles[0].shapes["keep_indices"][2] == (2, KEEP)

    llm = plans["llm"].profiles
    assert [p.name for p in llm] == ["prefill", "decode"]  # one engine, two profiles
    longest = manifest.llm.max_seq_len
    prefill, decode = (p.axes for p in llm)
    assert prefill[SEQUENCE] == (1, KEEP + engine_plan.TEXT_TOKENS, longest) and prefill[PAST] == (0, 0, 0)
    assert decode[SEQUENCE] == (1, 1, 1) and decode[PAST] == (0, KEEP + engine_plan.TEXT_TOKENS, longest - 1)
    for profile in llm:
        shapes = profile.shapes
        assert set(shapes) == {t.name for t in manifest.graphs["llm"].inputs}
        for i in range(3):  # min, opt, max: the mask covers the cache and the new tokens
            total = shapes["attention_mask"][i][1]
            assert total == shapes["past_key_values.0.key"][i][2] + shapes["inputs_embeds"][i][1]
            assert shapes["position_ids"][i][1] == shapes["inputs_embeds"][i][1]
        assert profile.axes[TOTAL][2] == longest


def test_in_llm_pruned_export_plans_every_block_and_select_graph(export_dir, monkeypatch):
    """FEATHER: each decoder block is a KV-cache engine with prefill and decode profiles, like `llm`; each
    select graph has only a batch axis and one profile; every graph gets its own engine file, and the build
    gets past its plan and lint to the point where it needs TensorRT."""
    directory = export_dir("llava15", None, method="feather")
    manifest = Manifest.read(directory)
    plans = {p.graph: p for p in engine_plan.plan(manifest, BuildOptions(directory, max_batch=2), major=10)}
    blocks = [key for key, _ in manifest.blocks()]
    selects = [key for keys in manifest.llm_pruning.select.values() for key in keys]
    assert blocks == ["llm.0", "llm.1", "llm.2"] and selects == ["select.image.1", "select.image.2"]
    assert set(plans) == set(manifest.graphs) >= {*blocks, *selects}
    longest = manifest.llm.max_seq_len
    for key in blocks:
        assert [p.name for p in plans[key].profiles] == ["prefill", "decode"], key
        assert set(plans[key].profiles[0].shapes) == {t.name for t in manifest.graphs[key].inputs}
        prefill, decode = (p.axes for p in plans[key].profiles)
        assert prefill[SEQUENCE][2] == longest and prefill[PAST] == (0, 0, 0), key
        assert decode[SEQUENCE] == (1, 1, 1) and decode[PAST][2] == longest - 1, key
    for key in selects:
        (profile,) = plans[key].profiles
        spec = manifest.graphs[key]
        assert profile.name == "default" and set(profile.axes) == {"batch"}, key
        for t in spec.inputs:  # batch 1..max_batch, every other dimension the graph's static one
            assert profile.shapes[t.name] == tuple((b, *t.shape[1:]) for b in (1, 1, 2)), key
    engines = {engine_meta.engine_path(directory, key).name for key in manifest.graphs}
    assert len(engines) == len(manifest.graphs) and "llm.1.engine" in engines and "select.image.2.engine" in engines
    monkeypatch.setattr(engine_build.trtexec, "detect_version", lambda binary: None)
    with pytest.raises(BuildError) as raised:
        engine_build.build(BuildOptions(directory, trt_version="10"))
    one_line(raised, "import tensorrt")


def test_max_seq_len_and_sub_images(tiny_export):
    manifest = Manifest.read(tiny_export(KEEP))
    sizes = engine_plan.graph_sizes(manifest, BuildOptions(tiny_export(KEEP), max_batch=3, max_seq_len=300))
    assert sizes["llm"].max_seq_len == 300 and sizes["llm"].max_batch == 3
    with pytest.raises(BuildError) as raised:
        engine_plan.graph_sizes(manifest, BuildOptions(tiny_export(KEEP), max_seq_len=manifest.llm.max_seq_len + 1))
    one_line(raised, "--max-seq-len", "re-export")

    def layout(data):
        return layout_from_dict(data)

    assert layout({"name": "single"}).sub_images == 1
    assert layout({"name": "anyres_fastervlm", "resolution": [672, 672], "tile": 336}).sub_images == 5
    assert layout({"name": "anyres_hf", "tile": 336, "newline": "n.npy",
                   "grid_pinpoints": [[336, 672], [1008, 336], [672, 672]]}).sub_images == 5
    assert layout({"name": "frames", "num_frames": 8}).sub_images == 8


# ------------------------------------------------------------------ precision per TensorRT version

def test_precision_per_tensorrt_version(tiny_export, tiny_export_fp16):
    fp32, fp16 = Manifest.read(tiny_export(KEEP)), Manifest.read(tiny_export_fp16)
    ten = {p.graph: p for p in engine_plan.plan(fp32, BuildOptions(tiny_export(KEEP)), major=10)}
    assert ten["vision"].flags == ("FP16",) and ten["vision"].pin_fp32 and not ten["vision"].strongly_typed
    strict = engine_plan.plan(fp32, BuildOptions(tiny_export(KEEP), precision="fp32"), major=10)[0]
    assert strict.flags == () and strict.clear_flags == ("TF32",) and not strict.pin_fp32
    for major in (10, 11):  # an fp16 export carries its own casts: strongly typed on both
        typed = engine_plan.plan(fp16, BuildOptions(tiny_export_fp16), major=major)[0]
        assert typed.strongly_typed and typed.flags == () and not typed.pin_fp32
    with pytest.raises(BuildError) as raised:
        engine_plan.plan(fp32, BuildOptions(tiny_export(KEEP)), major=11)
    one_line(raised, "TensorRT 11", "--dtype float16")
    with pytest.raises(BuildError) as raised:
        engine_plan.plan(fp16, BuildOptions(tiny_export_fp16, precision="fp32"), major=10)
    one_line(raised, "float16", "float32 export")


def test_int8_uses_calibrated_graphs_where_there_are_some(export_copy):
    manifest = Manifest.read(export_copy)
    options = BuildOptions(export_copy, precision="int8")
    with pytest.raises(BuildError) as raised:
        engine_plan.plan(manifest, options, major=10)
    one_line(raised, "python -m calibration", "--precision int8")
    # A Q/DQ graph as calibration names it (the content does not matter to the plan).
    shutil.copy(export_copy / "vision.onnx", export_copy / "vision.int8.onnx")
    plans = {p.graph: p for p in engine_plan.plan(manifest, options, major=10)}
    assert plans["vision"].onnx == "vision.int8.onnx" and plans["vision"].flags == ("INT8", "FP16")
    assert plans["llm"].onnx == "llm.onnx" and plans["llm"].precision == "fp16 (no llm.int8.onnx)"
    eleven = {p.graph: p for p in engine_plan.plan(manifest, options, major=11)}
    assert eleven["vision"].strongly_typed and eleven["vision"].flags == ()
    assert eleven["llm"].precision == "fp32 (no llm.int8.onnx)"
    # calibration.json says which graph a Q/DQ graph came from: a changed source is refused.
    record = {"int8": {"graphs": {"vision": {"file": "vision.int8.onnx", "source": "vision.onnx",
                                             "source_sha256": "0" * 64}}}}
    (export_copy / "calibration.json").write_text(json.dumps(record))
    with pytest.raises(BuildError) as raised:
        engine_plan.plan(manifest, options, major=10)
    one_line(raised, "vision.int8.onnx", "older vision.onnx")


def test_options_are_checked():
    for bad, named in [(dict(precision="bf16"), "--precision"), (dict(max_batch=0), "--max-batch"),
                       (dict(workspace_mib=0), "--workspace"), (dict(trt_version="9"), "--trt-version"),
                       (dict(onnx_suffix="a/b"), "--onnx-suffix")]:
        with pytest.raises(BuildError) as raised:
            BuildOptions(Path("x"), **bad)
        one_line(raised, named)


# ------------------------------------------------------------------ metadata, staleness, foreign engines

def fake_engine(export_dir: Path, graph: str, tensorrt="10.3.0", capability="8.7") -> None:
    """An engine *file* (bytes that are not an engine) with metadata written by build's own installer: what
    the staleness checks read. Nothing here pretends TensorRT built it; loading it needs TensorRT."""
    spec = Manifest.read(export_dir).graphs[graph]
    (export_dir / engine_meta.ENGINES_DIR).mkdir(exist_ok=True)
    files = [spec.file, spec.file + ".data"]
    meta = dict(graph=graph, onnx={f: engine_meta.digest(export_dir / f) for f in files}, tensorrt=tensorrt,
                gpu_name="Orin", compute_capability=capability, options={}, precision={}, profiles=[])
    engine_build._install(export_dir, graph, b"serialized engine bytes", meta)


def test_fresh_engine_passes_and_reads_back(export_copy):
    fake_engine(export_copy, "vision")
    meta = engine_meta.check_engine(export_copy, "vision", "10.3.0", "8.7")
    assert set(meta.onnx) == {"vision.onnx", "vision.onnx.data"} and meta.gpu_name == "Orin"
    assert meta.engine.size == len(b"serialized engine bytes")
    assert not list((export_copy / "engines").glob("*.partial"))  # atomic writes leave no temporary file


def test_changed_onnx_makes_the_engine_stale(export_copy):
    fake_engine(export_copy, "vision")
    data = export_copy / "vision.onnx.data"
    os.utime(data, ns=(1, 1))  # touched, same bytes: hashed again, still fresh
    assert engine_meta.stale_reason(export_copy, engine_meta.read_meta(export_copy, "vision")) is None
    content = bytearray(data.read_bytes())
    content[-1] ^= 0xFF  # same size, new bytes (a re-export with other weights)
    data.write_bytes(bytes(content))
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "vision")
    one_line(raised, "stale", "vision.onnx.data", "sha256", "python -m engines build")
    data.write_bytes(bytes(content) + b"x")
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "vision")
    one_line(raised, "stale", "bytes")


def test_changed_engine_file_is_stale(export_copy):
    fake_engine(export_copy, "projector")
    engine_meta.engine_path(export_copy, "projector").write_bytes(b"serialized engine bytez")
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "projector")
    one_line(raised, "projector.engine", "stale")


def test_foreign_engine_is_refused(export_copy):
    fake_engine(export_copy, "llm", tensorrt="10.3.0", capability="8.7")
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "llm", "10.16.1.11", "8.7")
    one_line(raised, "TensorRT 10.3.0", "TensorRT 10.16.1.11", "on this machine")
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "llm", "10.3.0", "9.0")
    one_line(raised, "compute capability 8.7", "Orin", "9.0")


def test_missing_or_corrupt_metadata(export_copy):
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "vision")
    one_line(raised, "no TensorRT engine", "python -m engines build")
    fake_engine(export_copy, "vision")
    engine_meta.meta_path(export_copy, "vision").write_text("{not json")
    with pytest.raises(ManifestError) as raised:
        engine_meta.check_engine(export_copy, "vision")
    one_line(raised, "vision.engine.json", "not valid engine metadata")


def test_runtime_refuses_stale_engines_then_says_tensorrt_is_needed(export_copy):
    from runtime.pipeline import Pipeline

    with pytest.raises(ManifestError) as raised:
        Pipeline.load(export_copy, backend="trt")
    one_line(raised, "no TensorRT engine", f"python -m engines build {export_copy}")
    for graph in ("vision", "projector", "llm"):
        fake_engine(export_copy, graph)
    (export_copy / "projector.onnx").write_bytes((export_copy / "projector.onnx").read_bytes())  # same bytes
    try:
        import tensorrt  # noqa: F401
    except Exception:  # what this test is about on a machine without TensorRT
        with pytest.raises(InputError) as raised:
            Pipeline.load(export_copy, backend="trt")
        one_line(raised, "tensorrt", "onnxruntime")
    else:  # with TensorRT the fake bytes are refused when they fail to deserialize
        with pytest.raises(ManifestError):
            Pipeline.load(export_copy, backend="trt")


# ------------------------------------------------------------------ the command line

def test_build_without_tensorrt_is_one_line(tiny_export, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here: test_tensorrt.py builds for real")
    except Exception:
        pass
    for argv in (["build", str(tiny_export(KEEP))], ["build", str(tiny_export(KEEP)), "--trt-version", "10"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "import tensorrt" in err and "python -m engines lint" in err, err


def test_build_refuses_before_tensorrt(tiny_export, tmp_path, capsys):
    cases = [(["build", str(tmp_path / "none")], "does not exist"),
             (["build", str(tiny_export(KEEP)), "--trt-version", "11"], "--dtype float16"),
             (["build", str(tiny_export(KEEP)), "--precision", "int8", "--trt-version", "10"], "python -m calibration"),
             (["build", str(tiny_export(KEEP)), "--max-batch", "0", "--trt-version", "10"], "--max-batch 0"),
             (["build", str(tiny_export(KEEP)), "--precision", "fp64"], "invalid choice")]
    for argv, named in cases:
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's own refusals exit from parse_args
            code = exit.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err, err


def test_lint_errors_refuse_the_build(export_copy, monkeypatch):
    """engines.lint runs for the target before anything is built: a graph TensorRT would reject stops it."""
    import onnx
    from onnx import helper

    model = onnx.load(str(export_copy / "projector.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node("Unique", [model.graph.input[0].name], ["u"], name="bad_unique"))
    onnx.save(model, str(export_copy / "projector.onnx"))
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["graphs"]["projector"]["sizes"]["projector.onnx"] = (export_copy / "projector.onnx").stat().st_size
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(engine_build.trtexec, "detect_version", lambda binary: None)
    with pytest.raises(BuildError) as raised:
        engine_build.build(BuildOptions(export_copy, trt_version="10"))
    one_line(raised, "engines lint", "Unique", "--trt 10.3")

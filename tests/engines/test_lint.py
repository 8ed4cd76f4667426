"""The static TensorRT lint: clean on real exports, and each documented problem found in a small hand-built graph."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from contract.manifest import Manifest
from engines.__main__ import main
from engines.lint import ERROR, WARNING, Finding, lint, lint_model

ROOT = Path(__file__).resolve().parents[2]
F32, I64, F64 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.DOUBLE


def model(nodes, inputs, outputs, initializers=(), opset=18, domains=()) -> onnx.ModelProto:
    """A small graph as the exporter would write it; onnx.checker keeps the fixtures themselves honest."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(graph, opset_imports=imports, ir_version=10)
    if not domains:
        onnx.checker.check_model(m)
    return m


def const(name, values, dtype=np.int64) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def topk_model(k_input="k", initializers=(const("k", [4]),), extra_inputs=(), nodes=()) -> onnx.ModelProto:
    top = helper.make_node("TopK", ["x", k_input], ["values", "indices"], name="topk", axis=-1)
    return model([*nodes, top], [("x", F32, [1, 16]), *extra_inputs],
                 [("values", F32, [1, "k"]), ("indices", I64, [1, "k"])], initializers)


def errors(findings: list[Finding], target: str | None = None) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR and (target is None or f.target == target)]


def describe(findings: list[Finding]) -> str:
    return "\n".join(f"{f.target} {f.severity} {f.op_type} {f.node}: {f.message}" for f in findings) or "(none)"


def test_real_export_has_no_findings(tiny_export):
    findings = lint(tiny_export(32))
    assert findings == [], describe(findings)
    assert set(Manifest.read(tiny_export(32)).graphs) >= {"projector", "llm"}  # the lint saw real graphs


def test_clean_hand_built_graph_has_no_findings():
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
               helper.make_node("Softmax", ["y"], ["z"], name="softmax")],
              [("x", F32, [1, 8])], [("z", F32, [1, 4])], [const("w", np.ones((8, 4)), np.float32)])
    assert lint_model(m) == []


@pytest.mark.parametrize("op", ["BitShift", "Unique"])
def test_documented_unsupported_operator(op):
    inputs = [("a", TensorProto.UINT8, [4]), ("b", TensorProto.UINT8, [4])] if op == "BitShift" else [("a", F32, [4])]
    node = helper.make_node(op, [i[0] for i in inputs], ["y"], name="bad", **({"direction": "LEFT"} if op == "BitShift" else {}))
    findings = lint_model(model([node], inputs, [("y", inputs[0][1], [4] if op == "BitShift" else ["n"])]))
    for target in ("10.3", "11"):
        found = [f for f in errors(findings, target) if f.op_type == op and "not supported" in f.message]
        assert found, describe(findings)
        assert found[0].node == "bad" and found[0].graph == "model"


def test_operator_added_after_10_3_is_refused_only_there():
    q = ("q", F32, [1, 2, 4, 8])
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")
    findings = lint_model(model([node], [q, ("k", F32, [1, 2, 4, 8]), ("v", F32, [1, 2, 4, 8])],
                                [("y", F32, [1, 2, 4, 8])], opset=23))
    assert any("10.14" in f.message for f in errors(findings, "10.3")), describe(findings)
    assert any("opset 23" in f.message for f in errors(findings, "10.3")), describe(findings)
    assert errors(findings, "11") == [], describe(findings)


def test_attention_with_kv_cache_inputs_is_refused():
    shapes = [("q", F32, [1, 2, 1, 8]), ("k", F32, [1, 2, 1, 8]), ("v", F32, [1, 2, 1, 8]),
              ("pk", F32, [1, 2, 3, 8]), ("pv", F32, [1, 2, 3, 8])]
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"], name="a")
    outputs = [("y", F32, [1, 2, 1, 8]), ("present_k", F32, [1, 2, 4, 8]), ("present_v", F32, [1, 2, 4, 8])]
    findings = lint_model(model([node], shapes, outputs, opset=23), targets=["11"])
    messages = " | ".join(f.message for f in errors(findings))
    for part in ("past_key", "past_value", "present_key", "present_value"):
        assert part in messages, describe(findings)


def test_not_an_onnx_operator_and_custom_domain():
    findings = lint_model(model([helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="fm", domain="com.microsoft"),
                                 helper.make_node("Frobnicate", ["y"], ["z"], name="fr")],
                                [("x", F32, [2, 2])], [("z", F32, [2, 2])], domains=["com.microsoft"]))
    assert any("com.microsoft::FusedMatMul" in f.message and "plugin" in f.message for f in errors(findings, "11"))
    assert any(f.node == "fr" and "not an ONNX operator at opset 18" in f.message for f in errors(findings, "10.3"))


def test_topk_with_k_from_a_graph_input():
    findings = lint_model(topk_model("k", initializers=(), extra_inputs=[("k", I64, [1])]))
    for target in ("10.3", "11"):
        found = [f for f in errors(findings, target) if f.op_type == "TopK"]
        assert len(found) == 1 and "not a build-time constant" in found[0].message, describe(findings)


def test_topk_with_k_from_a_static_dim_is_constant():
    """The vision graph's second TopK takes K from Shape(indices)[-1]: a static dim, so a constant."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "last"], ["k0"], axis=0),
             helper.make_node("Reshape", ["k0", "one"], ["kk"])]
    m = topk_model("kk", initializers=(const("last", -1), const("one", [1])), nodes=nodes)
    assert lint_model(m) == []
    too_large = topk_model(initializers=(const("k", [4000]),))
    too_large.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5000
    found = errors(lint_model(too_large))
    assert len(found) == 2 and all("K=4000" in f.message and "K < 3840" in f.message for f in found), describe(found)


def test_topk_unsorted_is_refused():
    m = topk_model()
    m.graph.node[-1].attribute.append(helper.make_attribute("sorted", 0))
    assert any("sorted" in f.message for f in errors(lint_model(m))), describe(lint_model(m))


def test_nonzero_has_a_data_dependent_shape():
    m = model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [("x", F32, [4])], [("y", I64, [1, "n"])])
    found = [f for f in errors(lint_model(m)) if "data-dependent" in f.message]
    assert {f.target for f in found} == {"10.3", "11"} and found[0].node == "nz"


def test_float64_tensors_are_reported_once_per_type():
    m = model([helper.make_node("Cast", ["x"], ["d"], to=F64), helper.make_node("Cast", ["d"], ["y"], to=F32)],
              [("x", F32, [4])], [("y", F32, [4])])
    found = [f for f in errors(lint_model(m), "10.3") if "DOUBLE" in f.message and f.op_type == ""]
    assert len(found) == 1 and "'d'" in found[0].message, describe(lint_model(m))


def test_operator_on_a_type_it_does_not_support():
    m = model([helper.make_node("MatMul", ["a", "b"], ["y"], name="int_mm")], [("a", I64, [2, 2]), ("b", I64, [2, 2])],
              [("y", I64, [2, 2])])
    found = errors(lint_model(m))
    assert len(found) == 2 and all(f.node == "int_mm" and "INT64" in f.message for f in found), describe(found)


@pytest.mark.parametrize("opset, bad_for", [(8, {"10.3", "11"}), (21, {"10.3"}), (25, {"10.3"})])
def test_opset_outside_the_parser_range(opset, bad_for):
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", F32, [4])], [("y", F32, [4])], opset=opset)
    findings = lint_model(m)
    assert {f.target for f in errors(findings) if "opset" in f.message} == bad_for, describe(findings)
    if opset == 25:  # inside 11's range, but only from 11.5 on
        assert [f.severity for f in findings if f.target == "11"] == [WARNING], describe(findings)


def test_squeeze_axes_strict_on_10_3_only():
    """10.3: `axes` must be an initializer; 11: resolvable to a constant. A folded constant differs."""
    shape_axes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["d0"]),
                  helper.make_node("Sub", ["d0", "one"], ["axes"]),  # = [0]: the static leading 1
                  helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")]
    m = model(shape_axes, [("x", F32, [1, 4])], [("y", F32, [4])], [const("zero", [0]), const("one", [1])])
    findings = lint_model(m)
    assert [(f.target, f.severity) for f in findings] == [("10.3", WARNING)], describe(findings)
    dynamic = model([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")],
                    [("x", F32, [1, 4]), ("axes", I64, [1])], [("y", F32, [4])])
    assert {f.target for f in errors(lint_model(dynamic)) if f.node == "sq"} == {"10.3", "11"}


# ---------------------------------------------------------------- command line


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses before main's body runs
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes(tiny_export, tmp_path, capsys):
    code, out, err = run_cli(capsys, "lint", str(tiny_export(32)))
    assert (code, err) == (0, "") and "no findings" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    source = tiny_export(32)
    for name in ["manifest.json", *(g.file for g in Manifest.read(source).graphs.values())]:
        shutil.copy(source / name, broken / name)
    bad = model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [("x", F32, [4])], [("y", I64, [1, "n"])])
    onnx.save(bad, broken / Manifest.read(source).graphs["projector"].file)
    code, out, err = run_cli(capsys, "lint", str(broken), "--trt", "11")
    assert code == 1 and "NonZero" in out and "data-dependent" in out and err == "", out
    code, out, err = run_cli(capsys, "lint", str(broken), "--json")
    import json

    report = json.loads(out)
    assert code == 1 and report["errors"] == 2 and report["targets"] == ["10.3", "11"]


def test_in_llm_pruned_exports_are_clean(export_dir, capsys):
    """FEATHER and FastV: every decoder block and select graph (TopK with a constant K, no NonZero) passes the
    lint for TensorRT 10.3 and 11."""
    for method, selects in (("feather", 2), ("fastv", 1)):
        directory = export_dir("llava15", None, method=method)
        graphs = set(Manifest.read(directory).graphs)
        assert {"llm.0", "llm.1"} <= graphs and len({g for g in graphs if g.startswith("select.")}) == selects
        code, out, err = run_cli(capsys, "lint", str(directory))
        assert (code, err) == (0, "") and "no findings against TensorRT 10.3 and TensorRT 11" in out, out


@pytest.mark.parametrize("argv, names", [
    (["lint", "/no/such/export"], "/no/such/export"),
    (["lint", "{tmp}", "--trt", "12"], "'12'"),
    (["lint", "{tmp}"], "manifest.json"),
    (["frobnicate"], "'frobnicate'"),
])
def test_cli_bad_input_is_one_line(argv, names, tmp_path, capsys):
    code, out, err = run_cli(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("error:") and names in err, err


def test_cli_corrupt_graph_file(tiny_export, tmp_path, capsys):
    source = tiny_export(32)
    shutil.copy(source / "manifest.json", tmp_path / "manifest.json")
    files = [g.file for g in Manifest.read(source).graphs.values()]
    for name in files:
        (tmp_path / name).write_bytes(b"\x00not onnx\xff" * 3)
    code, _, err = run_cli(capsys, "lint", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and files[0] in err, err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "engines", "lint", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--trt" in done.stdout and "10.3" in done.stdout

"""`python -m export ... --dtype float16`: fp16 graphs with fp32 islands, validated against PyTorch, run by
the unchanged runtime. Tolerances: export.precision.FP16_ATOL/RTOL (whole tensor) and top-k agreement."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from contract import compare, onnx_walk
from contract.errors import ExportError
from contract.manifest import Manifest
from export import precision
from export.families import llava15
from export.spec import ExportOptions

KEEP = 32


def input_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                                             *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def test_manifest_and_interface_stay_fp32(tiny_export, tiny_export_fp16):
    manifest, reference = Manifest.read(tiny_export_fp16), Manifest.read(tiny_export(KEEP))
    assert manifest.precision == "float16" and reference.precision == "float32"
    assert manifest.graphs.keys() == reference.graphs.keys()
    for name, spec in manifest.graphs.items():
        assert (spec.inputs, spec.outputs) == (reference.graphs[name].inputs, reference.graphs[name].outputs)
        model = onnx.load(str(tiny_export_fp16 / spec.file), load_external_data=False)
        assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} <= {
            TensorProto.FLOAT, TensorProto.INT64}
        weights = [i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        assert sum(i.data_type == TensorProto.FLOAT16 for i in weights) > len(weights) / 2, name
        assert spec.sizes[spec.file + ".data"] < reference.graphs[name].sizes[spec.file + ".data"] * 0.6
    from engines.lint import lint

    assert lint(tiny_export_fp16) == []  # the casts and fp16 types are within TensorRT 10.3's and 11's support


def test_islands_compute_in_fp32(tiny_export, tiny_export_fp16):
    """LayerNorm, Softmax, the [CLS]-score path, RMSNorm and the rotary angles read fp32 tensors."""
    for graph, expect in (("vision", {"LayerNormalization", "Softmax", "TopK", "ReduceMean"}),
                          ("llm", {"Softmax", "Pow", "ReduceMean", "Sqrt", "Cos", "Sin"})):
        source = onnx.load(str(tiny_export(KEEP) / f"{graph}.onnx"), load_external_data=False)
        islands = onnx_walk.fp32_islands(source)
        model = onnx.load(str(tiny_export_fp16 / f"{graph}.onnx"), load_external_data=False)
        types = input_types(model)
        checked = set()
        for node in model.graph.node:
            if node.op_type in expect or node.name in islands:
                floats = [types.get(t) for t in node.input[:1] if types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
                assert floats in ([], [TensorProto.FLOAT]), f"{graph} {node.op_type} {node.name} reads fp16"
                checked.add(node.op_type)
        assert expect <= checked, (graph, expect - checked)
    llm = onnx.load(str(tiny_export(KEEP) / "llm.onnx"), load_external_data=False)
    pows = [n for n in llm.graph.node if n.op_type == "Pow"]
    assert {n.name for n in pows} <= onnx_walk.rms_norm_nodes(llm.graph)
    assert len(pows) == 2 * 3 + 1  # input and post-attention norms of the tiny LLM's 3 layers, and the final norm


def test_validation_against_pytorch(tiny, tiny_export_fp16):
    model, _ = tiny
    manifest = Manifest.read(tiny_export_fp16)
    checks = []
    for graph in llava15.graphs(model, manifest.method):
        checks += precision.validate(graph, tiny_export_fp16, manifest.graphs[graph.name])
    table = compare.table(checks, "fp16 vs torch")
    print(table)
    assert all(c.ok for c in checks), table
    top_k = [c for c in checks if c.output == "keep_indices"]
    assert top_k and all(c.value == 1.0 for c in top_k), table  # identical sets on the validation inputs
    worst = max(c.value for c in checks if not c.is_set)
    assert 0 < worst, table  # fp16 is not fp32: a zero difference would mean nothing was converted


def test_runtime_answers_the_same(pipeline, tiny_export_fp16, photos):
    from runtime.pipeline import Pipeline

    fp16, fp32 = Pipeline.load(tiny_export_fp16), pipeline(KEEP)
    a = fp16.generate(photos["chelsea"], "What is in the picture?", max_new_tokens=8, return_logits=True)
    b = fp32.generate(photos["chelsea"], "What is in the picture?", max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(a.kept_indices, b.kept_indices)
    worst = max(float(np.abs(x - y).max()) for x, y in zip(a.logits, b.logits))
    scale = max(float(np.abs(y).max()) for y in b.logits)
    assert worst <= precision.FP16_ATOL + precision.FP16_RTOL * scale, f"logits differ by {worst:.3g}"
    assert a.token_ids == b.token_ids, f"tokens {a.token_ids} vs {b.token_ids} (logits within {worst:.3g})"


def test_rms_norm_island_prevents_fp16_overflow(tmp_path):
    """x**2 of hidden states above 256 overflows fp16: the RMSNorm island keeps the answer finite and right,
    while the same graph converted without it does not."""
    hidden = 8
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])
    init = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
            numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "weight"),
            numpy_helper.from_array(np.eye(hidden, dtype=np.float32), "proj")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="mean"),
             helper.make_node("Add", ["mean", "eps"], ["var"], name="add_eps"),
             helper.make_node("Sqrt", ["var"], ["std"], name="sqrt"),
             helper.make_node("Reciprocal", ["std"], ["inv"], name="rsqrt"),
             helper.make_node("Mul", ["x", "inv"], ["normed"], name="scale"),
             helper.make_node("Mul", ["weight", "normed"], ["weighted"], name="weigh"),
             helper.make_node("MatMul", ["weighted", "proj"], ["y"], name="linear")]
    model = helper.make_model(helper.make_graph(nodes, "rms", [x], [y], init),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(tmp_path / "rms.onnx"))
    assert onnx_walk.rms_norm_nodes(model.graph) == {"pow", "mean", "add_eps", "sqrt", "rsqrt", "scale", "weigh"}

    conversion = precision.convert_graph(tmp_path / "rms.onnx", tmp_path / "rms16.onnx")
    assert set(conversion.islands) == {"pow", "mean", "add_eps", "sqrt", "rsqrt", "scale", "weigh"}
    feed = {"x": np.linspace(-900, 900, hidden, dtype=np.float32)[None]}  # outliers as in a 7B LLM

    def run(path: Path) -> np.ndarray:
        # onnx's reference evaluator computes each node in its declared type, as a GPU does. (ONNX Runtime's
        # CPU provider inserts casts to fp32 around fp16 nodes it has no fp16 kernel for, Pow included.)
        return ReferenceEvaluator(onnx.load(os.fspath(path))).run(None, feed)[0]

    reference, island = run(tmp_path / "rms.onnx"), run(tmp_path / "rms16.onnx")
    assert island.dtype == np.float32  # fp32 interface
    assert np.isfinite(island).all()
    np.testing.assert_allclose(island, reference, atol=1e-2, rtol=1e-2)

    from onnxconverter_common import float16

    plain = float16.convert_float_to_float16(onnx.load(str(tmp_path / "rms.onnx")), keep_io_types=True)
    onnx.save(plain, str(tmp_path / "plain16.onnx"))
    naive = run(tmp_path / "plain16.onnx")
    assert not np.allclose(naive, reference, atol=1e-2, rtol=1e-2), "the plain conversion did not overflow"


def test_dtype_option_is_checked():
    with pytest.raises(ExportError) as raised:
        ExportOptions("llava15", KEEP, dtype="bfloat16")
    assert "--dtype 'bfloat16'" in str(raised.value) and "\n" not in str(raised.value)


def test_cli_dtype_refused_before_any_work(capsys):
    from export.__main__ import main

    assert main(["llava15", "--keep", "32", "--model", "tiny", "--dtype", "int4", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype 'int4'" in err

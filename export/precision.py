"""fp16 graphs with fp32 islands (`python -m export ... --dtype float16`), and the islands themselves.

After the fp32 graphs are exported and validated, each is converted with onnxconverter-common's maintained
converter and validated again against PyTorch:

    graph.onnx (fp32) --fp32_islands()--> nodes and op types kept fp32
                      --float16.convert_float_to_float16(keep_io_types=True, op/node block lists)-->
    graph.onnx (fp16 weights and compute; fp32 inputs, outputs and islands, Casts at their borders)
                      --ONNX Runtime vs PyTorch fp32 (FP16_ATOL/RTOL, top-k agreement)--> table

What stays fp32, and why:

    LayerNormalization, Softmax   mean/variance and exponentials: the known fp16 overflow/precision loss in
                                  ViT encoders and attention
    [CLS]-score path              the score layer's q/k projections, score matmul, softmax, head mean, TopK
                                  (calibration.nodes.score_path): fp16 error reorders near-tied scores and
                                  changes which tokens are kept
    RMSNorm                       x**2 overflows fp16 for |x| > 256, and LLM hidden states have outliers in
                                  the thousands: the Pow ... Mul(weight) chain of every decomposed RMSNorm
    rotary angles                 position * inv_freq up to Cos/Sin: fp16 has no exact integers above 2048

The inputs and outputs stay fp32 (`keep_io_types`), so the manifest's tensor specs and the runtime are
unchanged; the KV cache is stored in fp32 buffers but holds fp16-rounded values. The same islands are what
`python -m engines build` pins to FP32 in TensorRT 10 weakly typed builds (engines.build).

Conversion reads the graph structure without weights for shape inference (works past protobuf's 2 GB
limit), then loads the weights: it needs about 1.5x the fp32 graph's size in memory.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnx import external_data_helper, helper

from contract.compare import MIN_TOPK_AGREEMENT, Comparison, Tolerance, compare, table
from contract.errors import ExportError
from contract.manifest import GraphSpec
from contract.onnx_walk import FP32_OPS, fp32_islands

if TYPE_CHECKING:  # export.graph imports torch; fp32_islands must not (engines.build uses it on Jetson)
    from export.graph import GraphExport

DTYPES = ("float32", "float16")
# fp16 vs the fp32 PyTorch module, over the whole tensor: max|diff| <= atol + rtol * max|ref|. fp16 has an
# 11-bit significand (~5e-4 relative per rounding); errors accumulate over layers, hence 2 %.
FP16_ATOL, FP16_RTOL = 2e-2, 2e-2
FP16_TOLERANCE = Tolerance(FP16_ATOL, FP16_RTOL)



@dataclass(frozen=True)
class Conversion:
    graph: str
    fp32_nodes: int  # nodes kept fp32 by name (islands) or op type
    fp16_initializers: int
    islands: dict[str, str]  # node -> reason


def convert_graph(source: Path, target: Path, graph: str = "model") -> Conversion:
    """fp32 ONNX at `source` (+ external data) -> fp16 ONNX at `target` (+ `target.name`.data)."""
    from onnxconverter_common import float16

    model = onnx.load(os.fspath(source), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)  # value types for the converter, from structure only
    islands = fp32_islands(model)
    external_data_helper.load_external_data_for_model(model, os.fspath(source.parent))
    _isolate_outputs(model)
    with warnings.catch_warnings():  # it warns per clamped constant (the attention mask's -3.4e38 -> -1e4)
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True,
            op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
            node_block_list=sorted(islands),
        )
    onnx.save(converted, os.fspath(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location=target.name + ".data", size_threshold=1024)
    blocked = set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)
    return Conversion(
        graph=graph,
        fp32_nodes=sum(n.name in islands or n.op_type in blocked for n in model.graph.node),
        fp16_initializers=sum(i.data_type == onnx.TensorProto.FLOAT16 for i in converted.graph.initializer),
        islands=islands,
    )


def _isolate_outputs(model: onnx.ModelProto) -> None:
    """A graph output that other nodes also read (the LLM's `present.*`, read by the attention) gets an
    Identity of its own. Otherwise the converter's output Cast renames the tensor while its readers keep the
    old name with fp16 types (ONNX Runtime: "Type (tensor(float16)) ... does not match expected type")."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    shared = outputs & {name for node in graph.node for name in node.input}
    for name in sorted(shared):
        inner = f"{name}__fp16_inner"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}__output"))


def convert_export(directory: Path, specs: dict[str, GraphSpec]) -> tuple[dict[str, GraphSpec], list[Conversion]]:
    """Convert every graph of an export directory in place (through a scratch directory inside it);
    returns the specs with the new file sizes."""
    scratch = directory / ".fp16"
    scratch.mkdir()
    try:
        done, new_specs = [], {}
        for name, spec in specs.items():
            done.append(convert_graph(directory / spec.file, scratch / spec.file, name))
            data = spec.file + ".data"
            os.chmod(scratch / data, (directory / spec.file).stat().st_mode & 0o777)  # onnx writes it 0600
            (directory / data).unlink(missing_ok=True)
            os.replace(scratch / data, directory / data)  # data first: the graph names it
            os.replace(scratch / spec.file, directory / spec.file)
            sizes = {f: (directory / f).stat().st_size for f in (spec.file, data)}
            new_specs[name] = GraphSpec(spec.file, spec.inputs, spec.outputs, sizes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return new_specs, done


def run(directory: Path, exports: list[GraphExport], specs: dict[str, GraphSpec], validate_graphs: bool,
        progress) -> dict[str, GraphSpec]:
    """The exporter's float16 step: convert every graph, validate each against PyTorch, print the table.
    Raises ExportError (nothing is written: `directory` is the exporter's temporary directory) on failure."""
    with progress.step("converting the graphs to float16 (fp32 islands: LayerNorm, Softmax, [CLS] score, "
                       "RMSNorm, rotary angles)"):
        specs, conversions = convert_export(directory, specs)
    for c in conversions:
        progress.say(f"{c.graph}: {c.fp16_initializers} fp16 weights, {c.fp32_nodes} nodes kept fp32")
    if validate_graphs:
        checks = []
        for graph in exports:
            with progress.step(f"validating the float16 {graph.name} graph against PyTorch"):
                checks += validate(graph, directory, specs[graph.name])
        print(table(checks, "fp16 vs torch"), file=progress.stream, flush=True)
        require_ok(checks)
    return specs


# ------------------------------------------------------------------ validation against PyTorch

def validate(graph: GraphExport, directory: Path, spec: GraphSpec, seeds=(1, 2)) -> list[Comparison]:
    """The fp16 graph (ONNX Runtime, CPU) against the fp32 PyTorch module on the exporter's own validation
    inputs: float outputs within FP16_ATOL + FP16_RTOL * max|ref|, top-k sets agreeing >= MIN_TOPK_AGREEMENT."""
    from export.onnx_io import paired_outputs

    return [
        compare(graph.name, name, case, value, ref, tolerance=FP16_TOLERANCE, is_set=name in graph.set_outputs,
                min_agreement=MIN_TOPK_AGREEMENT)
        for case, name, value, ref in paired_outputs(graph, directory, spec, seeds)
    ]


def require_ok(checks: list[Comparison]) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        c = failed[0]
        what = f"top-k agreement {c.value:.3f}" if c.is_set else f"differs by {c.value:.3g}"
        raise ExportError(f"float16 validation failed: {c.graph} output {c.output!r} {what} ({c.limit}) on input "
                          f"{c.case}; nothing was written (export without --dtype float16)")

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

import numpy as np
import onnx
from onnx import external_data_helper, helper

from contract.errors import ExportError
from contract.manifest import GraphSpec

if TYPE_CHECKING:  # export.graph imports torch; fp32_islands must not (engines.build uses it on Jetson)
    from export.graph import GraphExport

DTYPES = ("float32", "float16")
FP32_OPS = ("LayerNormalization", "Softmax")
# fp16 vs the fp32 PyTorch module, over the whole tensor: max|diff| <= atol + rtol * max|ref|. fp16 has an
# 11-bit significand (~5e-4 relative per rounding); errors accumulate over layers, hence 2 %.
FP16_ATOL, FP16_RTOL = 2e-2, 2e-2
# Top-k sets (|A n B| / K, mean over rows): fp16 hidden states feed the fp32 score path, so a near-tie at
# the K-th place can flip. The calibration target for quantized graphs is the same 0.9.
MIN_TOPK_AGREEMENT = 0.9

SCORE_PATH = "[CLS]-score path: fp16 error reorders near-tied scores and changes the kept tokens"
RMS_NORM = "RMSNorm: x**2 overflows fp16 for |x| > 256"
ROTARY = "rotary angles: fp16 has no exact integer positions above 2048"
_NORM_TAIL = {"Add", "Sqrt", "Reciprocal", "Div", "Mul", "Cast"}  # mean(x^2) + eps -> sqrt -> 1/. -> x * .


def fp32_islands(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> why it stays fp32: the [CLS]-score path, RMSNorm chains, rotary angles.
    (LayerNormalization and Softmax stay fp32 by op type: FP32_OPS.)"""
    from calibration.nodes import ancestors, score_path

    graph = model.graph
    islands = {name: SCORE_PATH for name in score_path(graph)}
    islands.update({name: RMS_NORM for name in rms_norm_nodes(graph)})
    trig = [t for n in graph.node if n.op_type in ("Cos", "Sin") for t in n.input]
    rotary = ancestors(graph, trig) | {n.name for n in graph.node if n.op_type in ("Cos", "Sin")}
    islands.update({name: ROTARY for name in rotary if name not in islands})
    return islands


def rms_norm_nodes(graph: onnx.GraphProto) -> set[str]:
    """Every decomposed RMSNorm, as the exporter writes HF's `x * rsqrt(mean(x**2) + eps) * weight`:

        x --Pow(2)--> ReduceMean --Add(eps)--> Sqrt --Reciprocal--> Mul(x, .) --Mul(weight, .)-->
    The walk goes forward from the ReduceMean through element-wise ops to the Mul that reads x again, then
    takes the weight Mul after it when one operand is constant.
    """
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    found: set[str] = set()
    for mean in (n for n in graph.node if n.op_type == "ReduceMean"):
        square = producers.get(mean.input[0])
        if square is None or square.op_type != "Pow":
            continue
        x = square.input[0]
        chain, frontier, scaled = [square.name, mean.name], list(mean.output), None
        while frontier and scaled is None:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if node.op_type not in _NORM_TAIL or node.name in chain:
                    continue
                chain.append(node.name)
                if node.op_type == "Mul" and x in node.input:
                    scaled = node
                    break
                frontier.extend(node.output)
        if scaled is None:
            continue  # not a normalization of x: leave it to the converter
        found.update(chain)
        weight = [n for n in consumers.get(scaled.output[0], []) if n.op_type == "Mul"
                  and any(t in constants for t in n.input)]
        found.update(n.name for n in weight[:1])
    return found


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
        print(format_checks(checks), file=progress.stream, flush=True)
        require_ok(checks)
    return specs


# ------------------------------------------------------------------ validation against PyTorch

@dataclass(frozen=True)
class Fp16Check:
    graph: str
    output: str
    case: str
    value: float  # max |fp16 - torch|, or the top-k agreement for set outputs
    limit: str
    ok: bool
    is_set: bool = False


def validate(graph: GraphExport, directory: Path, spec: GraphSpec, seeds=(1, 2)) -> list[Fp16Check]:
    """The fp16 graph (ONNX Runtime, CPU) against the fp32 PyTorch module on the exporter's own validation
    inputs: float outputs within FP16_ATOL + FP16_RTOL * max|ref|, top-k sets agreeing >= MIN_TOPK_AGREEMENT."""
    from export.onnx_io import paired_outputs

    return [
        _check(graph.name, name, case, value, ref, name in graph.set_outputs)
        for case, name, value, ref in paired_outputs(graph, directory, spec, seeds)
    ]


def _check(graph: str, name: str, case: str, got: np.ndarray, ref: np.ndarray, is_set: bool) -> Fp16Check:
    if got.shape != ref.shape:
        return Fp16Check(graph, name, case, float("inf"), f"shape {ref.shape}", False)
    if is_set:
        agreement = topk_agreement(got, ref)
        return Fp16Check(graph, name, case, agreement, f"agreement >= {MIN_TOPK_AGREEMENT}",
                         agreement >= MIN_TOPK_AGREEMENT, is_set=True)
    diff = float(np.abs(got.astype(np.float64) - ref).max()) if got.size else 0.0
    limit = FP16_ATOL + FP16_RTOL * (float(np.abs(ref).max()) if ref.size else 0.0)
    return Fp16Check(graph, name, case, diff, f"{FP16_ATOL:g} + {FP16_RTOL:g}*max|ref|", diff <= limit)


def topk_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows of |A n B| / K for index sets in the last axis (1.0: identical sets)."""
    rows = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    if not rows[0].size:
        return 1.0
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(*rows)]))


def format_checks(checks: list[Fp16Check]) -> str:
    """One row per graph and output (the worst case); the KV-cache outputs folded into one row."""
    worst: dict[tuple[str, str], Fp16Check] = {}
    for c in checks:
        key = (c.graph, "present.*" if c.output.startswith("present.") else c.output)
        badness = (not c.ok, -c.value if c.is_set else c.value)
        old = worst.get(key)
        if old is None or badness > (not old.ok, -old.value if old.is_set else old.value):
            worst[key] = c
    rows = [("graph", "output", "fp16 vs torch", "tolerance", "result")]
    for (graph, output), c in worst.items():
        value = f"agreement {c.value:.3f}" + (" (same sets)" if c.value == 1.0 else "") if c.is_set else f"{c.value:.2e}"
        rows.append((graph, output, value, c.limit, "ok" if c.ok else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def require_ok(checks: list[Fp16Check]) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        c = failed[0]
        what = f"top-k agreement {c.value:.3f}" if c.is_set else f"differs by {c.value:.3g}"
        raise ExportError(f"float16 validation failed: {c.graph} output {c.output!r} {what} ({c.limit}) on input "
                          f"{c.case}; nothing was written (export without --dtype float16)")

"""Which nodes of an exported graph are quantized, which stay float and why, found from the graph itself.

The dynamo exporter names nodes after op types and counters (`node_MatMul_167`), not module paths, so
nothing here matches names. Roles come from structure:

    linear layer     MatMul (or Gemm) whose weight operand is a constant            -> quantized (default)
    score path       what FasterVLM's top-k is computed by: the score layer's [CLS] -> float, and their
                     q and k projections (k may be shared with the layer itself),      inputs made float again
                     score matmul, softmax, head mean, TopK input (`score_path`)
    LM head          the linear layer whose weight has the vocabulary dimension     -> float
    everything else  LayerNorm, Softmax, attention MatMuls (activation x activation),
                     the patch-embedding Conv, element-wise ops                     -> float (by op type)

Module paths from the exporter's node metadata (`pkg.torch.onnx.name_scopes`) are recorded next to node
names so calibration.json is readable; they are never used to decide anything.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field

import onnx

from contract.onnx_walk import constant_tensors, is_linear, score_path, source_constant

SCORE_PATH = (
    "computes FasterVLM's top-k score (the score layer's [CLS] q/k projections -> softmax -> head mean -> "
    "TopK input): low-precision error reorders near-tied scores and changes which tokens are kept, so it "
    "stays fp32 (a k projection shared with the layer's own attention stays fp32 for both)"
)
LM_HEAD = "the LLM's vocabulary projection: its error moves the next-token argmax directly, so it stays fp32"
FLOAT_OPS = {
    "LayerNormalization": "mean/variance over channels lose precision in 8 bits; kept fp32",
    "Softmax": "exponentials: attention weights (and the [CLS] score) are sensitive to input error; kept fp32",
    "MatMul": "attention matmuls (activation x activation, scores and context): kept fp32; on a real ViT, "
              "ModelOpt's defaults that quantize them reached 0.86 top-k agreement, Linear layers only 0.95",
    "Conv": "patch embedding of raw pixels, one small layer: only Linear layers are quantized; kept fp32",
    "TopK": "the selection itself (integer indices); never quantized",
    "other": "element-wise, shape and normalisation arithmetic (residual adds, activations, a decomposed "
             "RMSNorm, rotary embeddings, gathers): not Linear layers; kept fp32",
}


@dataclass(frozen=True)
class Exclusion:
    node: str
    module: str  # the exporter's module path, or the node name when the graph has no metadata
    reason: str


@dataclass(frozen=True)
class NodePlan:
    """What to hand ModelOpt for one graph, and what to record about it."""

    quantize: tuple[str, ...]  # node names of the linear layers to quantize
    modules: dict[str, str]  # node name -> module path, for every linear layer
    excluded: tuple[Exclusion, ...]  # linear layers deliberately kept float
    float_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes left float by op type

    def record(self) -> dict:
        return {
            "quantized": [{"node": n, "module": self.modules[n]} for n in self.quantize],
            "excluded": [vars(e) for e in self.excluded],
            "kept_float_by_op_type": {
                op: {"count": count, "reason": FLOAT_OPS[op]} for op, count in self.float_ops.items()
            },
        }


def plan(model: onnx.ModelProto, vocab_size: int | None = None) -> NodePlan:
    """Linear layers to quantize, minus the score path and (with `vocab_size`) the LM head."""
    graph = model.graph
    constants = constant_tensors(graph)
    linear = [n for n in graph.node if is_linear(n, constants)]
    modules = {n.name: module_path(n) for n in linear}
    score = score_path(graph)
    weight_shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    excluded, quantize = [], []
    for node in linear:
        if node.name in score:
            excluded.append(Exclusion(node.name, modules[node.name], SCORE_PATH))
        elif vocab_size is not None and vocab_size in weight_shapes.get(source_constant(graph, node.input[1]), ()):
            excluded.append(Exclusion(node.name, modules[node.name], LM_HEAD))
        else:
            quantize.append(node.name)
    linear_names = {n.name for n in linear}
    counts = Counter(n.op_type for n in graph.node if n.name not in linear_names)
    float_ops = {op: counts.pop(op) for op in FLOAT_OPS if op in counts}
    float_ops["other"] = sum(counts.values())
    return NodePlan(tuple(quantize), modules, tuple(excluded), float_ops)


def restore_float_inputs(model: onnx.ModelProto) -> list[str]:
    """Make the score path read float tensors again, then drop Q/DQ nodes nothing reads any more.

    ModelOpt puts one Q/DQ pair on a tensor and rewires *every* consumer to the dequantized copy, including
    consumers it was told not to quantize: the score layer's shared layer-norm output reaches the [CLS]
    k-projection (and so the TopK) through Q/DQ. Each such input is pointed back at the tensor the
    QuantizeLinear read. Returns "node <- tensor" for each rewired input.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    rewired = []
    score = score_path(graph)
    for node in graph.node:
        if node.name not in score:
            continue
        for index, tensor in enumerate(node.input):
            dq = producers.get(tensor)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
                rewired.append(f"{node.name} <- {q.input[0]}")
    _drop_unused_qdq(graph)
    return rewired


def dequantized_inputs(model: onnx.ModelProto, nodes: set[str] | None = None, op_types: tuple[str, ...] = ()) -> list[str]:
    """Nodes (by name or op type) that read a DequantizeLinear output: should be empty for float paths."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return [
        n.name for n in model.graph.node
        if ((nodes is not None and n.name in nodes) or n.op_type in op_types)
        and any(producers.get(t) is not None and producers[t].op_type == "DequantizeLinear" for t in n.input)
    ]


def module_path(node: onnx.NodeProto) -> str:
    """The module the exporter recorded for `node` (e.g. 'layers.2.self_attn.q_proj'), else its name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return re.sub(r"\.slice\([^)]*\)", "", str(scopes[-2]))  # layers[:-1] iterates as layers.slice(...)
    return node.name


def _drop_unused_qdq(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)

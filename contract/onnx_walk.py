"""Which nodes of an exported graph play which role, found from the graph's structure alone.

Shared by the exporter (fp16 islands), the engine builder (layers pinned to FP32) and the calibrator (what
stays float): one definition of FasterVLM's score path and of the fp32 islands. Reads graph structure only
(no weights, no torch, onnx only for the protobuf types), so it runs wherever the graphs are built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

LINEAR_OPS = ("MatMul", "Gemm")
_PASS_THROUGH = {"Transpose", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"}  # constant in -> constant out
_WITH_CONSTANT = {"Add", "Sub", "Mul", "Div"}  # with one constant operand: a bias or a scale
FP32_OPS = ("LayerNormalization", "Softmax")  # kept fp32 by op type in fp16 graphs and engines
# Why each island stays fp32 (recorded in conversions and engine metadata).
SCORE_PATH_FP32 = "[CLS]-score path: fp16 error reorders near-tied scores and changes the kept tokens"
RMS_NORM = "RMSNorm: x**2 overflows fp16 for |x| > 256"
ROTARY = "rotary angles: fp16 has no exact integer positions above 2048"
_NORM_TAIL = {"Add", "Sqrt", "Reciprocal", "Div", "Mul", "Cast"}  # mean(x^2) + eps -> sqrt -> 1/. -> x * .


def fp32_islands(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> why it stays fp32: the [CLS]-score path, RMSNorm chains, rotary angles.
    (LayerNormalization and Softmax stay fp32 by op type: FP32_OPS.)"""
    graph = model.graph
    islands = {name: SCORE_PATH_FP32 for name in score_path(graph)}
    islands.update({name: RMS_NORM for name in rms_norm_nodes(graph)})
    trig = [t for n in graph.node if n.op_type in ("Cos", "Sin") for t in n.input]
    rotary = ancestors(graph, trig) | {n.name for n in graph.node if n.op_type in ("Cos", "Sin")}
    islands.update({name: ROTARY for name in rotary if name not in islands})
    return islands


def rms_norm_nodes(graph: onnx.GraphProto) -> set[str]:
    """Every decomposed RMSNorm, as the exporter writes HF's `x * rsqrt(mean(x**2) + eps) * weight` or the LLM
    graph's `x / sqrt(mean(x**2) + eps) * weight` (export/llm.py, for ONNX Runtime's fusion):

        x --Pow(2)--> ReduceMean --Add(eps)--> Sqrt --Reciprocal--> Mul(x, .) --Mul(weight, .)-->
        x --Pow(2)--> ReduceMean --Add(eps)--> Sqrt --> Div(x, .) --Mul(weight, .)-->
    The walk goes forward from the ReduceMean through element-wise ops to the Mul or Div that reads x again,
    then takes the weight Mul after it when one operand is constant.
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
                if node.op_type in ("Mul", "Div") and x in node.input:
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


def score_path(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes FasterVLM's selection is computed by, from the score layer's projections on.

        exclusive    nodes that feed a TopK and no graph output that does not depend on one: the [CLS]
                     slice and q projection, the score matmul, softmax, head mean, the TopKs
        projections  the linear layers (and their bias add / reshape / transpose) whose outputs reach an
                     exclusive node: also the k projection when the exporter merged the score's keys with
                     the layer's own (identical weights and input), as it does for the bench model

    The layer-norm output the projections read is shared with the layer and is not in the set.
    """
    topks = [n for n in graph.node if n.op_type == "TopK"]
    if not topks:
        return set()
    producers = producers_of(graph)
    selection = ancestors(graph, [t for n in topks for t in n.input], producers) | {n.name for n in topks}
    downstream = descendants(graph, [t for n in topks for t in n.output])
    others = [o.name for o in graph.output if o.name not in downstream]
    exclusive = selection - ancestors(graph, others, producers)
    constants = constant_tensors(graph)
    path = set(exclusive)
    stack = [t for n in graph.node if n.name in exclusive for t in n.input]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in path:
            continue
        if is_linear(node, constants):
            path.add(node.name)  # a projection: the walk stops here, its input is the shared layer norm
        elif node.op_type in _PASS_THROUGH:
            path.add(node.name)
            stack.append(node.input[0])  # the data operand; shape operands are computed elsewhere
        elif node.op_type in _WITH_CONSTANT and sum(t not in constants for t in node.input) == 1:
            path.add(node.name)  # a bias add or scale: never a residual add (two activations)
            stack.extend(t for t in node.input if t not in constants)
    return path


def ancestors(graph: onnx.GraphProto, tensors: list[str], producers: dict | None = None) -> set[str]:
    producers = producers if producers is not None else producers_of(graph)
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


def descendants(graph: onnx.GraphProto, tensors: list[str]) -> set[str]:
    """Tensor names computed from `tensors` (them included)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    seen = set(tensors)
    stack = list(tensors)
    while stack:
        for node in consumers.get(stack.pop(), []):
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


def is_linear(node: onnx.NodeProto, constants: set[str]) -> bool:
    return node.op_type in LINEAR_OPS and len(node.input) > 1 and node.input[1] in constants


def producers_of(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors known before any input arrives: initializers, Constant outputs and reshapes/casts of them."""
    constants = {i.name for i in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type == "Constant" or (
            node.op_type in _PASS_THROUGH and all(t in constants for t in node.input if t)
        ):
            constants.update(node.output)
    return constants


def source_constant(graph: onnx.GraphProto, tensor: str) -> str:
    """The initializer a constant operand comes from (through transposes, casts, ...)."""
    producers = producers_of(graph)
    while tensor in producers and producers[tensor].op_type in _PASS_THROUGH:
        tensor = producers[tensor].input[0]
    return tensor

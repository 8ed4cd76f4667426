"""`--llm-weights int4 | int8`: the LLM graphs' linear weights (lm_head included) quantized, weight-only.

- int4, standard operators only (both targets): every linear layer but the lm_head is quantized with ONNX
  Runtime's HQQ quantizer (half-quadratic, blocks of 32 along the input dimension: 4-bit codes, a float scale
  and a *float* zero point per block). ONNX Runtime's fast int4 kernel takes integer zero points only (float
  ones run a slow path, ~10x slower here) and TensorRT's weight-only INT4 none at all, so the graph splits
  each dequantized weight s * (q - z) into s * (q - 8), a symmetric int4 `DequantizeLinear(block_size=32)`
  -> `MatMul` (ONNX Runtime fuses the pair into MatMulNBits, TensorRT reads it as weight-only INT4), plus
  the zero points' share s * (8 - z), which is constant per block: x @ that = (x summed per block) @ O, two
  small float MatMuls (E, the [K, K/32] block indicator shared by all layers of one width, then O [K/32, N])
  added to the first. Exact algebra; the offsets take as many bytes as the scales (a float per block). The
  lm_head (the widest linear, and the one whose error lands on the logits) is int8: per-output-channel
  `DequantizeLinear` -> `MatMul` (ONNX Runtime fuses it too). Round-to-nearest int4 everywhere, what this
  did before, agreed with fp32 on 57 % of SmolLM2-135M's next tokens, this on 95 %; with SmolLM2's weights
  moved off the Q4_1 grid it was shipped on (which flatters any format with float offsets per block), 54 %
  and 67 % (README, Benchmark).
- int8 (`--target onnxruntime` only): ONNX Runtime's com.microsoft MatMulNBits with 8-bit weights directly,
  round to nearest, symmetric, blocks of 32, accuracy level 4 (int8 compute, the fast CPU kernel).
Activations, the KV cache, norms and the vision side stay float; the embedding table the runtime looks tokens
up in stays float32. Quality on real weights: teacher-forced next-token agreement with fp32 on QUALITY_TEXT
(scripts/bench_llm.py, tests/export/test_llm_real_weights.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from contract.manifest import GraphSpec
from contract.progress import Progress

BLOCK_SIZE = 32
# Plain English prose (not seen by the model as a prompt template) on which int4 quality is measured: the
# teacher-forced next-token agreement with the float graph and the mean KL (scripts/bench_llm.py, the tests).
QUALITY_TEXT = (
    "The warehouse robot starts its shift before the lights come on. It rolls along the aisles, stops at each "
    "shelf and looks at what is there: boxes of screws, rolls of tape, a crate of apples that someone left in "
    "the wrong place. For every item it asks itself two questions. Is this where it belongs, and is anything "
    "in the way? Most of the time the answers are easy, and the robot moves on without slowing down. When a "
    "box has fallen into the path, it waits, takes another picture from closer, and decides whether to go "
    "around or to call for help. The people who work there say they stopped noticing it after a week, which "
    "is the best thing anyone can say about a machine. At the end of the day it returns to its charger, "
    "writes a short report of what it moved, and the building goes quiet again."
)
LLM_OPSET = 21  # blocked DequantizeLinear


BITS = {"int4": 4, "int8": 8}
ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations: the fast CPU kernel (level 0 unpacks per call)


def quantize(directory: Path, specs: dict[str, GraphSpec], keys: list[str], weights: str,
             progress: Progress) -> dict[str, GraphSpec]:
    """Rewrite the graphs `keys` (the LLM graphs) of `directory` with `weights` ("int4" | "int8") weights;
    returns the updated specs."""
    import onnx

    specs = dict(specs)
    for key in keys:
        spec = specs[key]
        path = directory / spec.file
        how = "HQQ int4, lm_head int8" if weights == "int4" else "int8"
        with progress.step(f"quantizing {key} weights ({how}, blocks of {BLOCK_SIZE})"):
            model = onnx.load(os.fspath(path))
            model = _int4(model) if weights == "int4" else _int8(model)
            for name in spec.sizes:
                (directory / name).unlink()
            onnx.save(model, os.fspath(path), save_as_external_data=True, location=path.name + ".data")
            onnx.checker.check_model(os.fspath(path))
            model = onnx.load(os.fspath(path), load_external_data=False)
            initializers = {i.name: i for i in model.graph.initializer}
            left = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                    and _constant_weight(initializers, n) and not _is_offset(n)]
            if left:
                raise RuntimeError(f"{spec.file}: {len(left)} linear layers were not quantized ({left[:3]})")
        files = [spec.file] + ([spec.file + ".data"] if (directory / (spec.file + ".data")).exists() else [])
        specs[key] = replace(spec, sizes={f: (directory / f).stat().st_size for f in files})
    return specs


def _int8(model):
    """ONNX Runtime's MatMulNBits with 8-bit weights (its quantizer has no QDQ form for 8 bits)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, quant_format=QuantFormat.QOperator,
                                          bits=8, accuracy_level=ACCURACY_LEVEL)
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)  # it logs every node it visits
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    return quantizer.model.model


OFFSET = "int4_offset"  # the names of the zero-point branches' nodes end with this (not linear layers to quantize)


def _is_offset(node) -> bool:
    return node.name.endswith(("/" + OFFSET + "_sum", "/" + OFFSET))


def _int4(model):
    """HQQ int4 linear layers as symmetric int4 DQ -> MatMul plus the zero points' float branch; the lm_head
    (the linear layer that writes the logits) int8 per output channel (see the module doc)."""
    import ml_dtypes
    import numpy as np
    import torch
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    lm_head = _lm_head(graph)
    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4))
    nodes, removed, added, indicators = [], set(), [], {}
    for node in graph.node:
        if not (node.op_type == "MatMul" and _constant_weight(initializers, node)):
            nodes.append(node)
            continue
        base = node.input[1]
        if node.name == lm_head:
            if base not in removed:
                w = numpy_helper.to_array(initializers[base]).astype(np.float32)
                scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / 127  # per output channel
                codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
                added += [numpy_helper.from_array(codes, base + "/int8"), numpy_helper.from_array(scale, base + "/scale")]
            removed.add(base)
            out = node.output[0]
            nodes += [helper.make_node("DequantizeLinear", [base + "/int8", base + "/scale"], [out + "/weight"], axis=1,
                                       name=out + "/dq"),
                      helper.make_node("MatMul", [node.input[0], out + "/weight"], [out], name=node.name)]
            continue
        k = initializers[base].dims[0]
        if base not in removed:  # a weight two MatMuls share is quantized once
            w = numpy_helper.to_array(initializers[base]).astype(np.float32)
            q, s, z = hqq.quantize_internal(torch.from_numpy(np.ascontiguousarray(w.T)), bits=4, group_size=BLOCK_SIZE)
            codes = (q.numpy()[:, :k].T - 8).astype(ml_dtypes.int4)  # [K, N]; q is [N, K padded to blocks]
            scale = s.numpy().T.astype(np.float32)  # [K/32, N]
            offset = (scale * (8.0 - z.numpy().T)).astype(np.float32)
            added += [numpy_helper.from_array(codes, base + "/int4"), numpy_helper.from_array(scale, base + "/scale"),
                      numpy_helper.from_array(offset, base + "/offset")]
            removed.add(base)
        if k not in indicators:  # E[i, b] = 1 where row i is in block b
            indicator = np.zeros((k, -(-k // BLOCK_SIZE)), np.float32)
            indicator[np.arange(k), np.arange(k) // BLOCK_SIZE] = 1
            indicators[k] = f"int4_block_sum_{k}"
            added.append(numpy_helper.from_array(indicator, indicators[k]))
        out = node.output[0]
        nodes += [
            helper.make_node("DequantizeLinear", [base + "/int4", base + "/scale"], [out + "/weight"], axis=0,
                             block_size=BLOCK_SIZE, name=out + "/dq"),
            helper.make_node("MatMul", [node.input[0], out + "/weight"], [out + "/codes"], name=node.name),
            helper.make_node("MatMul", [node.input[0], indicators[k]], [out + "/block_sum"],
                             name=out + "/" + OFFSET + "_sum"),
            helper.make_node("MatMul", [out + "/block_sum", base + "/offset"], [out + "/offset"],
                             name=out + "/" + OFFSET),
            helper.make_node("Add", [out + "/codes", out + "/offset"], [out], name=out + "/add"),
        ]
    kept = [i for i in graph.initializer if i.name not in removed]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + added)
    graph.ClearField("node")
    graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, LLM_OPSET)  # blocked int4 DequantizeLinear
    return model


def _lm_head(graph) -> str | None:
    """The name of the MatMul that computes the logits output (through ops that only reshape or slice)."""
    from contract import names
    from contract.onnx_walk import producers_of

    producers = producers_of(graph)
    node = producers.get(names.LOGITS)
    while node is not None and node.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity"):
        node = producers.get(node.input[0])
    return node.name if node is not None and node.op_type == "MatMul" else None


def _constant_weight(initializers: dict, node) -> bool:
    """The node's second input is a float initializer (a linear layer's weight, not an activation)."""
    weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
    return weight is not None and weight.data_type in (1, 10) and len(weight.dims) == 2

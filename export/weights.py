"""`--llm-weights int4 | int8`: the LLM graphs' linear weights (lm_head included) quantized, weight-only.

ONNX Runtime's own weight-only quantizer (`MatMulNBitsQuantizer`, round-to-nearest, symmetric, blocks of 32
along the input dimension).
- int4, in its QDQ form: each weight becomes an int4 initializer and a blocked DequantizeLinear (opset 21) in
  front of the unchanged MatMul. Standard operators only: ONNX Runtime fuses DequantizeLinear -> MatMul into
  its MatMulNBits kernel (int8 compute on CPU), TensorRT reads the pair as weight-only INT4 quantization.
- int8 (`--target onnxruntime` only): ONNX Runtime's com.microsoft MatMulNBits with 8-bit weights directly
  (the quantizer has no QDQ form for 8 bits), accuracy level 4 (int8 compute, the fast CPU kernel).
Activations, the KV cache, norms and the vision side stay float; the embedding table the runtime looks tokens
up in stays float32. Quality on real weights (SmolLM2-135M, teacher-forced next-token agreement with fp32 on
QUALITY_TEXT): int4 ~57 %, int8 96 % (scripts/bench_llm.py, README).
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
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    specs = dict(specs)
    bits = BITS[weights]
    form = QuantFormat.QDQ if bits == 4 else QuantFormat.QOperator
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, quant_format=form, bits=bits,
                                          accuracy_level=ACCURACY_LEVEL)
    for key in keys:
        spec = specs[key]
        path = directory / spec.file
        with progress.step(f"quantizing {key} weights to {weights} (blocks of {BLOCK_SIZE})"):
            quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
            level = quantizer_log.level
            # It logs every node it visits, and warns that it raises the opset to 21 (blocked int4 needs it):
            # the operators of an LLM graph mean the same in opsets 18 to 21; onnx.checker reads the result.
            quantizer_log.setLevel(logging.ERROR)
            try:
                quantizer = MatMulNBitsQuantizer(onnx.load(os.fspath(path)), algo_config=config)
                quantizer.process()
            finally:
                quantizer_log.setLevel(level)
            for name in spec.sizes:
                (directory / name).unlink()
            quantizer.model.save_model_to_file(os.fspath(path), use_external_data_format=True)
            onnx.checker.check_model(os.fspath(path))
            model = onnx.load(os.fspath(path), load_external_data=False)
            left = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and _constant_weight(model, n)]
            if left:
                raise RuntimeError(f"{spec.file}: {len(left)} linear layers were not quantized ({left[:3]})")
        files = [spec.file] + ([spec.file + ".data"] if (directory / (spec.file + ".data")).exists() else [])
        specs[key] = replace(spec, sizes={f: (directory / f).stat().st_size for f in files})
    return specs


def _constant_weight(model, node) -> bool:
    """The node's second input is a float initializer (a linear layer's weight, not an activation)."""
    initializers = {i.name: i for i in model.graph.initializer}
    weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
    return weight is not None and weight.data_type in (1, 10) and len(weight.dims) == 2

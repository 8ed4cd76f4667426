"""One graph through NVIDIA ModelOpt's ONNX post-training quantization, inside a scratch directory.

ModelOpt (0.47) rewrites the .onnx it is given in place and drops intermediate files next to its output,
so it only ever sees a copy in `work`. On CPU it needs `calibration_eps=["cpu"]`, and
`high_precision_dtype="fp32"` (its default converts every unquantized op to fp16). Its Q/DQ graphs are
then fixed up here: the score path reads float tensors again (see `nodes.restore_float_inputs`), the
external data file gets the export's naming (`NAME.onnx.data`) and ordinary permissions.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from calibration import nodes
from calibration.options import CalibrationError
from contract import onnx_walk

INSTALL_HINT = (
    "NVIDIA ModelOpt is not installed: run `bash scripts/setup.sh`, which installs nvidia-modelopt==0.47.0 "
    "with --no-deps so that it keeps the CPU onnxruntime"
)


@dataclass(frozen=True)
class Quantized:
    files: tuple[Path, ...]  # the .onnx file, then its external data file (if any), inside `work`
    rewired: tuple[str, ...]  # score-path inputs pointed back at float tensors
    qdq: dict[str, int]  # QuantizeLinear / DequantizeLinear node counts
    opset: int


def require_modelopt() -> None:
    """Fail early, with the install line, before any work is done."""
    import importlib.util

    if importlib.util.find_spec("modelopt") is None:
        raise CalibrationError(INSTALL_HINT)


def quantize(source: Path, out_name: str, work: Path, precision: str, method: str,
             calibration: dict[str, np.ndarray], plan: nodes.NodePlan, verbose: bool = False) -> Quantized:
    """Quantize `source` (an exported .onnx with external data) into `work/out_name`."""
    if not plan.quantize:
        raise CalibrationError(f"{source.name} has no Linear layers left to quantize; drop it from --graphs")
    copy = work / "input"
    copy.mkdir()
    for path in graph_files(source):
        shutil.copyfile(path, copy / path.name)
    output = work / out_name
    with _quiet(verbose):
        from modelopt.onnx.quantization import quantize as modelopt_quantize

        modelopt_quantize(
            str(copy / source.name),
            quantize_mode=precision,
            calibration_data=calibration,
            calibration_method=method,
            calibration_eps=["cpu"],
            high_precision_dtype="fp32",
            op_types_to_quantize=list(onnx_walk.LINEAR_OPS),
            nodes_to_quantize=[f"^{re.escape(name)}$" for name in plan.quantize],  # regexes, anchored
            use_external_data_format=True,
            output_path=str(output),
            log_level="INFO" if verbose else "ERROR",
        )
    shutil.rmtree(copy)
    if not output.is_file():
        raise RuntimeError(f"ModelOpt wrote no {output.name}")
    return _finish(output)


def _finish(output: Path) -> Quantized:
    """Restore the float score path, rename the external data to NAME.onnx.data, check the result."""
    model = onnx.load(str(output), load_external_data=False)
    rewired = nodes.restore_float_inputs(model)
    left = nodes.dequantized_inputs(model, onnx_walk.score_path(model.graph), ("LayerNormalization", "Softmax", "TopK"))
    if left:
        raise RuntimeError(f"{output.name}: nodes that must stay float still read dequantized tensors: {left}")
    data_name = f"{output.name}.data"
    locations = set()
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
                entry.value = data_name
    if len(locations) > 1:
        raise RuntimeError(f"{output.name}: ModelOpt split the weights over several files {sorted(locations)}")
    files = [output]
    if locations:
        os.replace(output.parent / locations.pop(), output.parent / data_name)
        files.append(output.parent / data_name)
    onnx.save_model(model, str(output))
    for path in files:
        os.chmod(path, 0o644)  # ModelOpt writes its data file 0600
    onnx.checker.check_model(str(output))
    counts = Counter(n.op_type for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Quantized(tuple(files), tuple(rewired),
                     {op: counts[op] for op in ("QuantizeLinear", "DequantizeLinear")}, opset)


def graph_files(source: Path) -> tuple[Path, ...]:
    """The .onnx file and the external data files it references."""
    model = onnx.load(str(source), load_external_data=False)
    data = sorted({e.value for t in _external_tensors(model) for e in t.external_data if e.key == "location"})
    return (source, *(source.parent / name for name in data))


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence ModelOpt and ONNX Runtime's calibration output (progress bars, "Failed to import TensorRT",
    NVML errors, all harmless on CPU) at the file-descriptor level, where C++ logging writes too.
    On an exception the captured text is printed, so a failure still shows what ModelOpt said."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        else:
            _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])

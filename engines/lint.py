"""Static TensorRT compatibility lint: every graph of an export against TensorRT's documented ONNX support.

Nothing here can parse a graph with TensorRT (it cannot be installed in CI), so the lint checks what the
documentation promises instead (engines.trt_onnx_ops): operators and their types at the graph's opset, the
restrictions that matter for prunevlm's graphs (TopK's K constant and below the limit, constant axes,
Attention's unsupported inputs), no data-dependent output shapes, and tensor types TensorRT has. It reads
only the graph structure (`load_external_data=False`) plus the few small constants it must evaluate, so it
runs in about a second and can gate `python -m engines build`.

    python -m engines lint EXPORT_DIR [--trt 10.3|11] [--json]     # exit 0 clean, 1 errors, 2 bad input
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from contract.compare import format_table
from contract.errors import ManifestError
from contract.manifest import Manifest
from engines.trt_onnx_ops import DATA_DEPENDENT_SHAPE_OPS, ONNX_TO_TRT, TARGET_NAMES, TARGETS, Target

if TYPE_CHECKING:
    import numpy as np
    import onnx

ERROR, WARNING = "error", "warning"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FOLD_MAX_ELEMENTS = 4096  # constants larger than this are weights, not shape arithmetic: never evaluated
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout"})


@dataclass(frozen=True)
class Finding:
    """One problem TensorRT would have with a graph, for one target version."""

    graph: str  # the manifest's graph name ("vision", "llm", ...)
    node: str  # node name; "" for graph-level findings (opset, tensor types)
    op_type: str  # "" for graph-level findings
    severity: str  # "error": TensorRT documents it as unsupported; "warning": works with care
    message: str
    target: str  # the TensorRT version it applies to ("10.3", "11")


class _Facts:
    """What can be known about a graph without its weights: types, shapes, and constant-folded values.

    Values are folded the way TensorRT's shape analysis would see them: initializers and Constant nodes, the
    static dims that Shape reads, and small integer arithmetic on them (e.g. the vision graph's second TopK
    takes K from `Shape(indices)[-1]`, which is the static 32).
    """

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        import onnx
        from onnx import TensorProto

        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference is a convenience; the raw graph still has inputs/outputs typed
            inferred = model
        graph = inferred.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, list[int | None]] = {}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            tensor = value.type.tensor_type
            if tensor.elem_type:
                self.dtypes[value.name] = onnx.TensorProto.DataType.Name(tensor.elem_type)
            if tensor.HasField("shape"):
                self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        self.weights: set[str] = set()  # initializers and Constant outputs: what the parser imports as weights
        self.known: dict[str, np.ndarray] = {}
        self.partial: dict[str, list[int | None]] = {}  # 1-D integer vectors with some entries unknown
        for init in graph.initializer:
            self.weights.add(init.name)
            self.dtypes[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
            self.shapes[init.name] = list(init.dims)
            if init.data_type in (TensorProto.INT32, TensorProto.INT64) and _numel(init.dims) <= _FOLD_MAX_ELEMENTS:
                value = _to_array(init, base_dir)
                if value is not None:
                    self.known[init.name] = value
        for node in graph.node:
            self._fold(node)

    def _fold(self, node: onnx.NodeProto) -> None:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        inputs = [name for name in node.input if name]
        if node.op_type == "Constant":
            self.weights.update(node.output)
            for attr in node.attribute:
                if attr.name == "sparse_value":
                    continue
                value = helper.get_attribute_value(attr)
                if attr.name == "value":
                    self.dtypes[node.output[0]] = TensorProto.DataType.Name(value.data_type)
                    value = numpy_helper.to_array(value)
                self.known[node.output[0]] = np.asarray(value)
            return
        if node.op_type == "Shape" and node.input[0] in self.shapes:
            attrs = {a.name: a.i for a in node.attribute}
            dims = self.shapes[node.input[0]][attrs.get("start", 0):attrs.get("end")]
            self._store(node.output[0], dims)
            return
        if inputs and all(name in self.known for name in inputs):
            if node.op_type in _RANDOM_OPS or sum(self.known[n].size for n in inputs) > _FOLD_MAX_ELEMENTS:
                return
            try:
                from onnx.reference import ReferenceEvaluator

                outputs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, {n: self.known[n] for n in inputs})
            except Exception:  # an op the reference cannot run: the value stays unknown, nothing is claimed
                return
            self.known.update((name, np.asarray(v)) for name, v in zip(node.output, outputs) if name)
            return
        if not inputs or inputs[0] not in self.partial:
            return
        vector = self.partial[inputs[0]]
        if node.op_type in ("Identity", "Cast"):
            self._store(node.output[0], vector)
        elif node.op_type == "Gather" and node.input[1] in self.known:
            index = self.known[node.input[1]]
            picked = [vector[int(i)] if -len(vector) <= int(i) < len(vector) else None for i in index.reshape(-1)]
            if index.ndim == 0 and picked[0] is not None:
                self.known[node.output[0]] = np.asarray(picked[0], dtype=np.int64)
            elif index.ndim == 1:
                self._store(node.output[0], picked)
        elif node.op_type == "Slice" and all(n in self.known for n in node.input[1:] if n):  # 1-D: axes is [0]
            starts, ends, *rest = (int(self.known[n].reshape(-1)[0]) if n else None for n in node.input[1:])
            step = rest[1] if len(rest) > 1 and rest[1] is not None else 1
            self._store(node.output[0], vector[starts:ends:step])
        elif node.op_type == "Concat" and all(n in self.known or n in self.partial for n in inputs):
            parts = [self.partial.get(n) or [int(v) for v in self.known[n].reshape(-1)] for n in inputs]
            self._store(node.output[0], [d for part in parts for d in part])

    def _store(self, name: str, dims: list[int | None]) -> None:
        import numpy as np

        if all(d is not None for d in dims):
            self.known[name] = np.asarray(dims, dtype=np.int64)
        else:
            self.partial[name] = list(dims)

    def is_constant(self, name: str) -> bool:
        return name in self.known or name in self.weights

    def is_dynamic(self, name: str) -> bool:
        """Known to vary at run time. Names this graph does not describe (a subgraph's) are neither."""
        return not self.is_constant(name) and (name in self.dtypes or name in self.shapes or name in self.partial)


def _numel(dims: Sequence[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def _to_array(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray | None:
    """A small initializer's value, reading its bytes from the external data file when it lives there."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    if external_data_helper.uses_external_data(tensor) and base_dir is None:
        return None
    try:
        return numpy_helper.to_array(tensor, base_dir=str(base_dir or ""))
    except (OSError, ValueError, onnx.checker.ValidationError):  # no or short .data file: value stays unknown
        return None


def lint(export_dir: str | Path, targets: Sequence[str] = TARGET_NAMES) -> list[Finding]:
    """Findings for every graph the export's manifest lists, against each TensorRT target.

    Raises ManifestError (a UserError: exit code 2) for a missing or corrupt export, never a finding.
    """
    import onnx

    directory = Path(export_dir)
    manifest = Manifest.read(directory)
    findings: list[Finding] = []
    for name, spec in manifest.graphs.items():
        path = directory / spec.file
        if not path.is_file():
            raise ManifestError(f"{path} is missing: the export is incomplete, re-export the model")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises several types for truncated or foreign files
            raise ManifestError(f"{path} is not a readable ONNX file ({type(exc).__name__}); re-export") from None
        findings += lint_model(model, name, targets, base_dir=directory)
    return findings


def lint_model(model: onnx.ModelProto, graph: str = "model", targets: Sequence[str] = TARGET_NAMES,
               base_dir: Path | None = None) -> list[Finding]:
    """Findings for one ONNX model; `base_dir` lets small external constants (TopK's K) be read."""
    facts = _Facts(model, base_dir)
    functions = {(f.domain, f.name) for f in model.functions}
    nodes = list(_walk(model))
    findings: list[Finding] = []
    for name in targets:
        target = TARGETS[name]

        def add(node: onnx.NodeProto | None, severity: str, message: str) -> None:
            findings.append(Finding(graph, node.name if node else "", node.op_type if node else "", severity,
                                    message, target.name))

        if not target.opset_min <= facts.opset <= target.opset_max:
            add(None, ERROR, f"ONNX opset {facts.opset} is outside the {target.opset_min}-{target.opset_max} "
                             f"range the {target.description} parser supports; re-export with --opset 18")
        elif facts.opset in target.opset_notes:
            add(None, WARNING, target.opset_notes[facts.opset])
        for node in nodes:
            for severity, message in _check_node(node, facts, target, functions):
                add(node, severity, message)
        for severity, message in _check_dtypes(facts, target):
            add(None, severity, message)
    return findings


def _walk(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: the main graph, subgraphs of If/Loop/Scan, and local functions' bodies."""
    from onnx import AttributeProto

    def nodes_of(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
        for node in nodes:
            yield node
            for attr in node.attribute:
                graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
                for sub in graphs:
                    yield from nodes_of(sub.node)

    yield from nodes_of(model.graph.node)
    for function in model.functions:
        yield from nodes_of(function.node)


def _check_node(node: onnx.NodeProto, facts: _Facts, target: Target,
                functions: set[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    import onnx

    op = node.op_type
    if node.domain not in _DEFAULT_DOMAINS:
        if (node.domain, op) not in functions:  # a local function's body is checked node by node instead
            yield ERROR, (f"custom-domain operator {node.domain}::{op} is not an ONNX operator: the TensorRT "
                          "parser needs a plugin registered under that name")
        return
    try:
        onnx.defs.get_schema(op, facts.opset, "")
    except onnx.defs.SchemaError:
        yield ERROR, f"{op} is not an ONNX operator at opset {facts.opset}"
        return
    if op in target.unsupported:
        yield ERROR, f"{op} is not supported by {target.description}: {target.unsupported[op]}"
        return
    support = target.ops.get(op)
    if support is None:
        yield ERROR, f"{op} is not in the {target.description} ONNX operator support matrix"
        return
    if op in DATA_DEPENDENT_SHAPE_OPS:
        yield ERROR, (f"{op} has a data-dependent output shape; prunevlm's engines preallocate every buffer "
                      "from the manifest's shapes")
    if support.typed_input < 0:
        typed = node.output[0] if node.output else ""
    else:
        typed = node.input[support.typed_input] if support.typed_input < len(node.input) else ""
    dtype = facts.dtypes.get(typed) if typed else None
    if support.types is not None and dtype is not None and ONNX_TO_TRT.get(dtype) not in support.types:
        yield ERROR, (f"{op} on {dtype} tensor {typed!r}: {target.description} documents {op} for "
                      f"{', '.join(sorted(support.types))} only")
    for index in support.const_inputs:
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            continue
        if facts.is_dynamic(name):
            yield ERROR, f"{op} input {index} ({name!r}) is not a build-time constant: {support.note}"
        elif support.const_strict and facts.is_constant(name) and name not in facts.weights:
            yield WARNING, (f"{op} input {index} ({name!r}) is constant only after folding: {support.note}; run "
                            "`polygraphy surgeon sanitize --fold-constants` before building")
    yield from _SPECIAL.get(op, _no_checks)(node, facts, target)


def _no_checks(node: onnx.NodeProto, facts: _Facts, target: Target) -> Iterator[tuple[str, str]]:
    return iter(())


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _check_topk(node: onnx.NodeProto, facts: _Facts, target: Target) -> Iterator[tuple[str, str]]:
    """K must be a constant below the limit: prunevlm's kept-token count is a static shape of the graphs."""
    if _attr(node, "sorted", 1) != 1:
        yield ERROR, "TopK with sorted=0: TensorRT requires `sorted` to be 1"
    if len(node.input) < 2:  # opset < 10: K is an attribute
        k_value = _attr(node, "k", None)
    elif node.input[1] in facts.known:
        k_value = int(facts.known[node.input[1]].reshape(-1)[0])
    elif not facts.is_dynamic(node.input[1]):
        return  # an initializer whose bytes are not at hand, or a subgraph's tensor: nothing to claim
    else:
        yield ERROR, (f"TopK's K ({node.input[1]!r}) is not a build-time constant: the output shape becomes "
                      "data-dependent and the K limit cannot be checked")
        return
    if k_value is not None and k_value >= target.topk_k_limit:
        yield ERROR, f"TopK with K={k_value}: {target.description} requires K < {target.topk_k_limit}"


def _check_attention(node: onnx.NodeProto, facts: _Facts, target: Target) -> Iterator[tuple[str, str]]:
    for index, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if index < len(node.input) and node.input[index]:
            yield ERROR, f"Attention input `{what}` is unsupported by {target.description}"
    for index, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if index < len(node.output) and node.output[index]:
            yield ERROR, f"Attention output `{what}` is unsupported by {target.description}"
    for name in ("qk_matmul_output_mode", "softcap"):
        if _attr(node, name, 0) != 0:
            yield ERROR, f"Attention attribute `{name}` is unsupported by {target.description}"
    for index, what in enumerate(("Q", "K", "V", "attn_mask")):
        shape = facts.shapes.get(node.input[index]) if index < len(node.input) and node.input[index] else None
        if shape is not None and len(shape) != 4:
            yield ERROR, f"Attention `{what}` has rank {len(shape)}: {target.description} requires 4D"


def _check_extra_outputs(node: onnx.NodeProto, facts: _Facts, target: Target) -> Iterator[tuple[str, str]]:
    """LayerNormalization (Mean, InvStdDev) and MaxPool (Indices): only the first output is supported."""
    if any(node.output[1:]):
        yield ERROR, f"{node.op_type} uses more than its first output: {target.ops[node.op_type].note}"


def _check_rotary(node: onnx.NodeProto, facts: _Facts, target: Target) -> Iterator[tuple[str, str]]:
    if len(node.input) > 3 and node.input[3] and facts.dtypes.get(node.input[3], "INT64") != "INT64":
        yield ERROR, f"RotaryEmbedding `position_ids` is {facts.dtypes[node.input[3]]}: it must be INT64"


_SPECIAL = {"TopK": _check_topk, "Attention": _check_attention, "LayerNormalization": _check_extra_outputs,
            "MaxPool": _check_extra_outputs, "RotaryEmbedding": _check_rotary}


def _check_dtypes(facts: _Facts, target: Target) -> Iterator[tuple[str, str]]:
    """Tensor types TensorRT lacks, grouped per type so a float64 graph gives one line, not hundreds."""
    by_type: dict[str, list[str]] = {}
    for name, dtype in facts.dtypes.items():
        if dtype == "DOUBLE" or ONNX_TO_TRT.get(dtype) not in target.dtypes:
            by_type.setdefault(dtype, []).append(name)
    for dtype, names in sorted(by_type.items()):
        where = f"{len(names)} tensor(s), e.g. {', '.join(repr(n) for n in names[:3])}"
        if dtype == "DOUBLE":
            yield ERROR, (f"DOUBLE (float64) {where}: TensorRT has no float64; its parser casts DOUBLE down to "
                          "FLOAT with clamping to +-FLT_MAX, silently changing the numerics: export float32")
        else:
            yield ERROR, f"{dtype} {where}: {target.description} has no such tensor type"


# ---------------------------------------------------------------- command line (python -m engines lint)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="an export directory (python -m export ...)")
    parser.add_argument("--trt", choices=TARGET_NAMES, action="append", metavar="VERSION",
                        help=f"TensorRT version to check against: {' or '.join(TARGET_NAMES)} (repeatable; "
                             "default: all). 10.3 is Jetson Orin's JetPack 6; 11 is the current 11.x")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    """Exit code 0: no errors (warnings allowed); 1: TensorRT would reject a graph; 2: bad input."""
    targets = tuple(dict.fromkeys(args.trt or TARGET_NAMES))
    findings = lint(args.export_dir, targets)
    errors = sum(f.severity == ERROR for f in findings)
    if args.json:
        print(json.dumps({"export_dir": str(args.export_dir), "targets": list(targets), "errors": errors,
                          "warnings": len(findings) - errors, "findings": [asdict(f) for f in findings]}, indent=2))
    else:
        print(format_findings(findings, targets))
    return 1 if errors else 0


def format_findings(findings: Sequence[Finding], targets: Sequence[str]) -> str:
    """A table, one finding per line, then a one-line verdict."""
    names = " and ".join(f"TensorRT {t}" for t in targets)
    errors = sum(f.severity == ERROR for f in findings)
    if not findings:
        return f"lint: no findings against {names}"
    header = ("graph", "trt", "severity", "op", "node", "message")
    rows = [header] + [(f.graph, f.target, f.severity, f.op_type or "-", f.node or "-", f.message) for f in findings]
    verdict = f"lint: {errors} error(s), {len(findings) - errors} warning(s) against {names}"
    return format_table(rows, indent="") + "\n" + verdict


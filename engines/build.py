"""`python -m engines build EXPORT_DIR`: one TensorRT engine per graph into EXPORT_DIR/engines/, with metadata.

    python -m engines build EXPORT_DIR [--precision fp32|fp16|int8|fp8] [--max-batch N] [--max-seq-len N]
        [--workspace MiB] [--timing-cache FILE] [--trt-version auto|10|11] [--onnx-suffix .int8] [--force]

Order: options and manifest -> the plan (engines/plan.py: ONNX file, typing, flags, profiles per graph) ->
`engines.lint` for the TensorRT version (refused on errors) -> tensorrt and the GPU -> per graph: skipped
when its engine is up to date (same options, ONNX sha256, TensorRT version and GPU), else built. Engine,
metadata and timing cache are written to temporary files and renamed (contract.files): an interrupted build
leaves the old files or none, never a half-written one; the metadata is renamed into place before its engine,
so an engine prunevlm built always has metadata beside it (an engine whose metadata is ahead is refused as
stale). A build holds EXPORT_DIR/.engines.lock: two builds of one export do not run together. Only files it
wrote are replaced: an `engines` that is not a directory, an engine without prunevlm metadata beside it, and a
--timing-cache that is not a regular file are refused before any work.

TensorRT calls (written against the documented Python API of 10.x and 11.x):
  trt.Builder, create_network(1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED) (deprecated and always on
      in 11.0: https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html),
      create_builder_config, create_optimization_profile, build_serialized_network
      https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  trt.OnnxParser.parse_from_file (keeps the file's directory, so external data `.onnx.data` is found)
      https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
  IBuilderConfig set_memory_pool_limit(MemoryPoolType.WORKSPACE), set_flag / clear_flag, add_optimization_profile,
      create_timing_cache / set_timing_cache / get_timing_cache
      https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
      https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/_static/c-api/classnvinfer1_1_1_i_builder_config.html
  IOptimizationProfile.set_shape(name, min, opt, max)
      https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
  ILayer.precision, set_output_type ("in a weakly-typed network"), BuilderFlag.OBEY_PRECISION_CONSTRAINTS
      https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvinfer1_1_1_i_layer.html
  What 11.x removed (BuilderFlag.FP16/INT8/FP8/OBEY_PRECISION_CONSTRAINTS, IBuilderConfig.int8_calibrator):
      https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from contract import engine_meta, files
from contract.errors import ManifestError
from contract.manifest import TOOLKIT_VERSION, Manifest, check_files
from engines import trtexec
from engines.plan import LINT_TARGET, PRECISIONS, TRT_VERSIONS, BuildError, BuildOptions, GraphPlan, plan, require_standard

NO_TENSORRT = ("python -m engines build needs TensorRT's Python package, and `import tensorrt` failed: on Jetson it "
               "comes with JetPack 6.1+ (apt install python3-libnvinfer), elsewhere pip install tensorrt; "
               "`python -m engines lint` and scripts/trtexec_profile.py run without it")
FP8_MIN_CC = (8, 9)  # Ada and Hopper; Jetson Orin (8.7) has no FP8


@dataclass(frozen=True)
class Outcome:
    plan: GraphPlan
    status: str  # "built in 41.0 s", "up to date"
    engine_bytes: int
    fp32_layers: int | None  # layers pinned to FP32 (None: strongly typed or skipped)


def build(options: BuildOptions, log=None) -> list[Outcome]:
    """Build (or keep) every engine of `options.export_dir`; returns what happened per graph."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    manifest = Manifest.read(options.export_dir)
    require_standard(manifest, options.export_dir)
    for spec in manifest.graphs.values():
        check_files(options.export_dir, spec)
    label = f"the engines of {files.quoted(options.export_dir)}"
    with files.signals_raise(), files.locked(options.export_dir, engine_meta.ENGINES_DIR, label, BuildError):
        _check_outputs(options, manifest)
        return _build(options, manifest, log)


def _check_outputs(options: BuildOptions, manifest: Manifest) -> None:
    """Refuse, before any work, to replace what build did not write (see the module doc); remove what a
    killed build left (`.GRAPH.engine.partial-*`). Called with the export's engines lock held."""
    directory = options.export_dir / engine_meta.ENGINES_DIR
    if os.path.lexists(directory):
        files.require_directory(directory, "the engines directory", BuildError)
        for graph in manifest.graphs:
            engine, meta = engine_meta.engine_path(options.export_dir, graph), engine_meta.meta_path(options.export_dir, graph)
            for path in (engine, meta):
                files.clear_stale(directory, path.name)
                files.require_replaceable_file(path, "engine file", BuildError)
            if meta.exists() and not _is_meta(meta):
                raise BuildError(f"{files.quoted(meta)} is not engine metadata prunevlm wrote; move it away to build")
            if engine.exists() and not meta.exists():
                raise BuildError(f"{files.quoted(engine)} has no {meta.name} beside it, so prunevlm did not build it; "
                                 "move it away to build")
    if options.timing_cache:
        files.require_replaceable_file(options.timing_cache, "--timing-cache", BuildError)


def _is_meta(path: Path) -> bool:
    """Engine metadata of any format version (an older one is still ours, and stale)."""
    try:
        if path.stat().st_size > files.MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "format_version" in data and "graph" in data


def _build(options: BuildOptions, manifest: Manifest, log) -> list[Outcome]:
    detected = trtexec.detect_version(None)
    requested = None if options.trt_version == "auto" else int(options.trt_version)
    if requested is None and detected is None:
        raise BuildError(NO_TENSORRT)
    if requested is not None and detected is not None and detected[0] != requested:
        raise BuildError(f"--trt-version {requested} contradicts the installed TensorRT {'.'.join(map(str, detected))}")
    major = requested or detected[0]
    if major not in LINT_TARGET:
        raise BuildError(f"TensorRT {'.'.join(map(str, detected))} is installed; prunevlm builds with TensorRT 10 or 11")
    plans = plan(manifest, options, major)
    _lint(options.export_dir, plans, manifest, LINT_TARGET[major])
    if detected is None:
        raise BuildError(NO_TENSORRT)

    from runtime.backends.cuda import cuda
    from runtime.backends.tensorrt import import_tensorrt

    trt = import_tensorrt()
    device = cuda().device()
    if options.precision == "fp8" and tuple(map(int, device.compute_capability.split("."))) < FP8_MIN_CC:
        raise BuildError(f"--precision fp8 needs compute capability 8.9+ (Ada, Hopper); {device.name} has "
                         f"{device.compute_capability} (Jetson Orin has no FP8): use --precision int8")
    cache = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    (options.export_dir / engine_meta.ENGINES_DIR).mkdir(exist_ok=True)
    outcomes = []
    for item in plans:
        wanted = item.options(options, major)
        if not options.force and _up_to_date(options.export_dir, item.graph, wanted, trt.__version__, device):
            size = engine_meta.engine_path(options.export_dir, item.graph).stat().st_size
            outcomes.append(Outcome(item, "up to date", size, None))
            continue
        log(f"building the {item.graph} engine from {item.onnx} ({item.precision}) ...")
        began = time.perf_counter()
        engine, cache, pinned = build_engine(trt, item, options, cache)
        seconds = time.perf_counter() - began
        onnx_files = [item.onnx] + ([item.onnx + ".data"] if (options.export_dir / (item.onnx + ".data")).is_file() else [])
        meta = dict(graph=item.graph, onnx={f: engine_meta.digest(options.export_dir / f) for f in onnx_files},
                    tensorrt=trt.__version__, gpu_name=device.name, compute_capability=device.compute_capability,
                    options=wanted, profiles=[{"name": p.name, "shapes": {k: [list(s) for s in v]
                                                                           for k, v in p.shapes.items()}}
                                              for p in item.profiles],
                    precision={"graph": item.precision, "strongly_typed": item.strongly_typed,
                               "flags": list(item.flags), "fp32_layers": pinned},
                    built={"seconds": round(seconds, 1), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "prunevlm": TOOLKIT_VERSION})
        size = _install(options.export_dir, item.graph, engine, meta)
        if options.timing_cache:
            with files.atomic_file(options.timing_cache, BuildError, "--timing-cache") as f:
                f.write(cache)
        outcomes.append(Outcome(item, f"built in {seconds:.1f} s", size, pinned))
    return outcomes


def _lint(export_dir: Path, plans: list[GraphPlan], manifest: Manifest, target: str) -> None:
    """engines.lint on the manifest's graphs, plus any Q/DQ graph the plan builds from; refuse on errors."""
    import onnx

    from engines.lint import ERROR, lint, lint_model

    findings = lint(export_dir, (target,))
    for item in plans:
        if item.onnx != manifest.graphs[item.graph].file:
            model = onnx.load(str(export_dir / item.onnx), load_external_data=False)
            findings += lint_model(model, item.graph, (target,), base_dir=export_dir)
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        first = errors[0]
        raise BuildError(f"engines lint found {len(errors)} error(s) against TensorRT {target}, e.g. {first.graph} "
                         f"{first.op_type or ''} {first.node or ''}: {first.message} (python -m engines lint "
                         f"{export_dir} --trt {target} lists them)")


def _up_to_date(export_dir: Path, graph: str, wanted: dict, version: str, device) -> bool:
    try:
        meta = engine_meta.read_meta(export_dir, graph)
    except ManifestError:  # none yet, or unreadable: build
        return False
    return (meta.options == wanted and meta.gpu_name == device.name
            and engine_meta.foreign_reason(meta, version, device.compute_capability) is None
            and engine_meta.stale_reason(export_dir, meta) is None)


def build_engine(trt, item: GraphPlan, options: BuildOptions, cache: bytes):
    """Parse the ONNX, configure, build. -> (serialized engine, timing cache bytes, layers pinned to FP32)."""
    from runtime.backends.tensorrt import trt_logger

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if item.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # 11.x: always on, flag ignored
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    path = options.export_dir / item.onnx
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no error recorded"]
        raise BuildError(f"TensorRT's ONNX parser rejected {path.name}: {errors[0].splitlines()[0]} "
                         f"({len(errors)} error(s))")
    config = builder.create_builder_config()
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    for flag in item.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in item.clear_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    pinned = None
    if item.pin_fp32:
        pinned = pin_fp32(trt, network, fp32_nodes(path))
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for profile in item.profiles:
        if profile.shapes:
            trt_profile = builder.create_optimization_profile()
            for name, (low, opt, high) in profile.shapes.items():
                trt_profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(trt_profile)
    config.set_timing_cache(config.create_timing_cache(cache), ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError(f"TensorRT could not build the {item.graph} engine from {path.name} (its log above says why)")
    return engine, bytes(memoryview(config.get_timing_cache().serialize())), pinned


def fp32_nodes(path: Path) -> set[str]:
    """ONNX node names of the fp32 islands (contract.onnx_walk.fp32_islands), from the graph's structure."""
    import onnx

    from contract.onnx_walk import fp32_islands

    return set(fp32_islands(onnx.load(str(path), load_external_data=False)))


def pin_fp32(trt, network, nodes: set[str]) -> int:
    """Pin to FP32 (ILayer.precision and the float outputs' types) every LayerNorm, Softmax and TopK layer and
    every layer parsed from a node in `nodes`. The parser names a layer after its ONNX node, with `_N` added
    when one node makes several layers. Returns how many layers were pinned."""
    types = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.TOPK}
    floats = (trt.float32, trt.float16)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        base = re.sub(r"_\d+$", "", layer.name)
        if layer.type not in types and layer.name not in nodes and base not in nodes:
            continue
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outputs:
            continue  # shape arithmetic, integer casts: nothing to pin
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _install(export_dir: Path, graph: str, engine, meta: dict) -> int:
    """Engine to a temporary file, then its metadata renamed into place, then the engine (a rename keeps the
    size and mtime the metadata records). Returns the engine's size."""
    path = engine_meta.engine_path(export_dir, graph)
    with files.atomic_file(path, BuildError, "engine") as f:
        f.write(engine)
        f.flush()
        stat = os.fstat(f.fileno())
        record = engine_meta.EngineMeta(engine=engine_meta.FileDigest(
            hashlib.sha256(memoryview(engine)).hexdigest(), stat.st_size, stat.st_mtime_ns), **meta)
        with files.atomic_file(engine_meta.meta_path(export_dir, graph), BuildError, "engine metadata") as m:
            m.write(record.to_json().encode() + b"\n")
    return stat.st_size


def format_outcomes(outcomes: list[Outcome]) -> str:
    rows = [("graph", "onnx", "precision", "profiles", "engine", "status")]
    for o in outcomes:
        pinned = f", {o.fp32_layers} layers FP32" if o.fp32_layers else ""
        rows.append((o.plan.graph, o.plan.onnx, o.plan.precision + pinned,
                     "; ".join(p.describe() for p in o.plan.profiles), f"{o.engine_bytes / 2**20:.1f} MiB", o.status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---------------------------------------------------------------- command line (python -m engines build)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="an export directory (python -m export ...)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="fp16 (default), fp32, or int8/fp8 from the Q/DQ graphs of `python -m calibration`; "
                             "TensorRT 11 builds fp16 only from a `--dtype float16` export")
    parser.add_argument("--max-batch", type=int, default=1, help="prompts per call the engines accept (default 1)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt + answer tokens the LLM engine accepts (default: the export's max_seq_len)")
    parser.add_argument("--workspace", dest="workspace_mib", type=int, default=None, metavar="MiB",
                        help="builder workspace limit in MiB (default: TensorRT's, the device's memory)")
    parser.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                        help="tactic timing cache, read when it exists and written back (faster rebuilds)")
    parser.add_argument("--trt-version", choices=TRT_VERSIONS, default="auto",
                        help="auto (default): the installed tensorrt; 10 or 11: refuse any other")
    parser.add_argument("--onnx-suffix", default=None, metavar="SUFFIX",
                        help="int8/fp8: build from GRAPH<SUFFIX>.onnx (default .int8 / .fp8, the names "
                             "python -m calibration writes)")
    parser.add_argument("--force", action="store_true", help="rebuild engines that are up to date")


def run(args: argparse.Namespace) -> int:
    options = BuildOptions(args.export_dir, args.precision, args.max_batch, args.max_seq_len, args.workspace_mib,
                           args.timing_cache, args.trt_version, args.onnx_suffix, args.force)
    print(format_outcomes(build(options)))
    return 0

"""What `python -m engines build` builds for each graph, decided without TensorRT: the ONNX file, how the
network is typed, the builder flags, whether layers are pinned to FP32, the optimization profiles. Pure
functions of the manifest and the options (tested on CPU); engines/build.py makes the TensorRT calls.

Optimization profiles come from the manifest's named axes through engines.trtexec (the same computation
as the trtexec commands: total_sequence = past_sequence + sequence at min, opt and max):

    vision, projector  one profile: batch 1 .. max_batch x sub-images per item (LLaVA-NeXT's anyres: 5,
                       Video-LLaVA's frames: 8, LLaVA-1.5: 1)
    select.*           (FEATHER / FastV) one profile: batch 1 .. max_batch, every other dimension static
    llm, llm.0, ...    each LLM graph (the whole decoder, or each decoder block of FEATHER / FastV: the graphs
                       of Manifest.blocks(), those with a KV cache) is ONE engine with TWO profiles, 0 = prefill
                       (sequence 1..max_seq_len, empty past) and 1 = decode (one token, past
                       0..max_seq_len-1). Not two engines: an engine holds one copy of the weights whatever
                       its number of profiles, and two engines would hold two (2 x 13.5 GB for LLaVA-1.5-7B
                       in fp16: more than a 32 GB Jetson Orin has); each profile is still tuned at its own opt
                       shapes, and the KV buffers are shared by both phases. (scripts/trtexec_profile.py
                       builds one engine per phase: there the point is a separate per-layer table for each
                       phase.)

Precision, the way each TensorRT version wants it:

    TensorRT 10   fp32 export: weakly typed network, builder flags FP16 / INT8+FP16 / FP8+FP16; LayerNorm,
                  Softmax, TopK and the fp32 islands (the [CLS]-score path, RMSNorm, rotary angles:
                  contract.onnx_walk.fp32_islands) pinned with ILayer.precision + set_output_type and
                  OBEY_PRECISION_CONSTRAINTS. fp32: no flags, TF32 cleared (strict fp32).
                  fp16 export: strongly typed (the graph's own casts), as on TensorRT 11.
    TensorRT 11   always strongly typed (the per-precision flags and OBEY_PRECISION_CONSTRAINTS are gone):
                  fp16 needs an export made with `--dtype float16`; int8/fp8 need Q/DQ graphs.
    int8, fp8     the Q/DQ graphs `python -m calibration` wrote beside the fp32 ones (vision.int8.onnx, ...;
                  --onnx-suffix names others); a graph without one (the LLM unless calibrated with --graphs
                  llm) is built at the export's own precision (fp16 on TensorRT 10), and the table says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from contract.errors import ManifestError, UserError
from contract.manifest import Manifest
from engines import trtexec

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
TRT_VERSIONS = ("auto", "10", "11")
LINT_TARGET = {10: "10.3", 11: "11"}  # engines.lint target per major version
TEXT_TOKENS = 64  # prompt text around the image, for the opt sequence length (as scripts/trtexec_profile.py)


class BuildError(UserError):
    """An option, export or environment `python -m engines build` cannot work with (one line, exit 2)."""


@dataclass(frozen=True)
class BuildOptions:
    export_dir: Path
    precision: str = "fp16"  # one of PRECISIONS
    max_batch: int = 1  # prompts (items) per call; the vision graph's batch is this x sub-images per item
    max_seq_len: int | None = None  # prompt + answer; None: the manifest's max_seq_len
    workspace_mib: int | None = None  # builder workspace limit; None: TensorRT's default (the device's memory)
    timing_cache: Path | None = None  # read if it exists, written back after each engine
    trt_version: str = "auto"  # "auto": the installed tensorrt; "10"/"11": insist on that major version
    onnx_suffix: str | None = None  # Q/DQ graph names: vision<suffix>.onnx; None: ".int8" / ".fp8"
    force: bool = False  # rebuild engines that are up to date

    def __post_init__(self) -> None:
        object.__setattr__(self, "export_dir", Path(self.export_dir))
        if self.precision not in PRECISIONS:
            raise BuildError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.trt_version not in TRT_VERSIONS:
            raise BuildError(f"--trt-version {self.trt_version!r} is not one of {', '.join(TRT_VERSIONS)}")
        if not 1 <= self.max_batch <= 256:
            raise BuildError(f"--max-batch {self.max_batch} is out of range; use 1..256")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise BuildError(f"--max-seq-len {self.max_seq_len} must be at least 2")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise BuildError(f"--workspace {self.workspace_mib} must be a positive number of MiB")
        if self.onnx_suffix is not None and (not self.onnx_suffix or "/" in self.onnx_suffix):
            raise BuildError(f"--onnx-suffix {self.onnx_suffix!r} must be a non-empty file-name part such as .int8")

    @property
    def suffix(self) -> str:
        return self.onnx_suffix if self.onnx_suffix is not None else f".{self.precision}"


@dataclass(frozen=True)
class Profile:
    name: str  # "default", "prefill", "decode"
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # dynamic input -> min, opt, max
    axes: dict[str, tuple[int, int, int]]  # named axis -> min, opt, max (for the table and the metadata)

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(f"{axis} {lo}..{hi}" for axis, (lo, _, hi) in self.axes.items()
                                             if hi)


@dataclass(frozen=True)
class GraphPlan:
    graph: str
    onnx: str  # file in the export directory the engine is built from
    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag names to set (TensorRT 10 weakly typed only)
    clear_flags: tuple[str, ...]  # BuilderFlag names to clear ("TF32" for strict fp32)
    pin_fp32: bool  # pin LayerNorm/Softmax/TopK and the fp32 islands (+ OBEY_PRECISION_CONSTRAINTS)
    precision: str  # what the graph gets, in words, for the table and the metadata
    profiles: tuple[Profile, ...]

    def options(self, build: BuildOptions, major: int) -> dict:
        """What shapes the engine (metadata `options`; a difference means the engine must be rebuilt)."""
        return {"precision": build.precision, "graph_precision": self.precision, "onnx": self.onnx,
                "strongly_typed": self.strongly_typed, "flags": list(self.flags), "clear_flags": list(self.clear_flags),
                "pin_fp32": self.pin_fp32, "max_batch": build.max_batch,
                "profiles": [{"name": p.name, "axes": {a: list(r) for a, r in p.axes.items()}} for p in self.profiles],
                "workspace_mib": build.workspace_mib, "tensorrt_major": major}


def graph_sizes(manifest: Manifest, options: BuildOptions) -> dict[str, trtexec.Sizes]:
    """engines.trtexec.Sizes per graph: the batch scaled by sub-images for the graphs that see them."""
    longest = manifest.llm.max_seq_len
    max_seq_len = options.max_seq_len or longest
    if max_seq_len > longest:
        raise BuildError(f"--max-seq-len {max_seq_len} is more than this export handles ({longest}); "
                         "re-export with a larger --max-seq-len")
    per_graph = manifest.sub_images()
    # The prompt's unpruned visual tokens. Blocks after an in-LLM prune point see fewer (FEATHER on
    # LLaVA-1.5: 576, then at most 236, then at most 21) and keep these opt/max sequence sizes all the same:
    # the max must stay max_seq_len (pruning shortens the prompt, not the answer), and a longer opt costs
    # tuning at a less typical shape, never correctness.
    visual = max(manifest.method.keep * m.layout.sub_images for m in manifest.modalities.values())
    seq_len = min(visual + TEXT_TOKENS, max_seq_len - 1)
    return {name: trtexec.Sizes(batch=per_graph.get(name, 1), max_batch=options.max_batch * per_graph.get(name, 1),
                                seq_len=seq_len, max_seq_len=max_seq_len)
            for name in manifest.graphs}


def profiles(spec, sizes: trtexec.Sizes) -> tuple[Profile, ...]:
    """Prefill and decode profiles for a KV-cache graph, one profile otherwise (engines.trtexec's ranges)."""
    phases = trtexec.PHASES if trtexec.has_phases(spec) else ("default",)
    out = []
    for phase in phases:
        ranges = trtexec.axis_ranges(sizes, "prefill" if phase == "default" else phase)
        used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
        shapes = trtexec.graph_profile(spec, sizes, "prefill" if phase == "default" else phase).shapes
        out.append(Profile(phase, shapes, {axis: ranges[axis] for axis in ranges if axis in used}))
    return tuple(out)


def require_standard(manifest: Manifest, directory) -> None:
    """TensorRT builds `--target standard` exports only: refused before anything is built or imported."""
    if manifest.target != "standard":
        raise ManifestError(f"{directory} was exported with --target {manifest.target}: its LLM graphs use ONNX "
                            "Runtime's own operators, which TensorRT cannot parse; re-export with --target standard")


def plan(manifest: Manifest, options: BuildOptions, major: int) -> list[GraphPlan]:
    """One GraphPlan per graph of the manifest, for TensorRT `major` (10 or 11)."""
    dtype = manifest.precision
    directory = options.export_dir
    sizes = graph_sizes(manifest, options)
    if options.precision == "fp32" and dtype != "float32":
        raise BuildError(f"this export is {dtype}: fp32 engines need a float32 export (python -m export without --dtype)")
    if options.precision == "fp16" and major == 11 and dtype != "float16":
        raise BuildError("TensorRT 11 has no FP16 builder flag (strongly typed networks only): re-export with "
                         "`python -m export ... --dtype float16`, or pass --precision fp32")
    quantized = options.precision in ("int8", "fp8")
    variants = {name: _variant(directory, spec.file, options.suffix) for name, spec in manifest.graphs.items()}
    if quantized and not any((directory / v).is_file() for v in variants.values()):
        raise BuildError(f"--precision {options.precision} builds from Q/DQ graphs and {directory} has none "
                         f"(*{options.suffix}.onnx): run `python -m calibration {directory} --images DIR "
                         f"--precision {options.precision}` first")
    plans = []
    for name, spec in manifest.graphs.items():
        onnx, precision = spec.file, options.precision
        if quantized and (directory / variants[name]).is_file():
            _check_calibrated_from(directory, variants[name], options.precision)
            onnx, precision = variants[name], f"{options.precision} (Q/DQ: {variants[name]})"
        elif quantized:
            fallback = "fp16" if major == 10 or dtype == "float16" else "fp32"
            precision = f"{fallback} (no {variants[name]})"
        weak = major == 10 and dtype == "float32"
        reduced = options.precision != "fp32"
        flags: tuple[str, ...] = ()
        if weak and reduced:  # Q/DQ layers need their precision's flag; FP16 lets the rest run in half
            flags = ("FP16",) if onnx == spec.file else (options.precision.upper(), "FP16")
        plans.append(GraphPlan(
            graph=name, onnx=onnx, strongly_typed=not weak, flags=flags,
            clear_flags=("TF32",) if options.precision == "fp32" else (),
            pin_fp32=weak and reduced, precision=precision, profiles=profiles(spec, sizes[name]),
        ))
    return plans


def _variant(directory: Path, file: str, suffix: str) -> str:
    return f"{Path(file).stem}{suffix}.onnx"


def _check_calibrated_from(directory: Path, variant: str, precision: str) -> None:
    """A Q/DQ graph whose calibration.json entry names a source graph that has changed since is refused."""
    record_path = directory / "calibration.json"
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text())
        graphs = record.get(precision, {}).get("graphs", {}).values()
    except (OSError, ValueError, AttributeError):
        raise BuildError(f"{record_path} is not readable JSON; move it away or calibrate again") from None
    for entry in graphs:
        if isinstance(entry, dict) and entry.get("file") == variant:
            source = directory / str(entry.get("source", ""))
            if source.is_file() and hashlib.sha256(source.read_bytes()).hexdigest() != entry.get("source_sha256"):
                raise BuildError(f"{variant} was calibrated from an older {source.name}: run `python -m calibration "
                                 f"{directory} ... --precision {precision}` again")

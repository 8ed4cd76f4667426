"""trtexec command lines from an export's manifest, and trtexec's per-layer profile as a top-N table.

trtexec is NVIDIA's build-and-benchmark tool; it ships with TensorRT, in no wheel. What the tests check without
it is that the commands are right: the optimization profile comes from the
manifest's named dynamic axes (never from guessing), the LLM's axes stay consistent
(total_sequence = past_sequence + sequence at min, opt and max alike), tensor names are written the way
trtexec's option parser reads them, and the precision flags exist in the installed TensorRT major version
(TensorRT 11 removed --fp16/--int8/--best: precision comes from the ONNX itself).

Syntax, from trtexec's source (samples/common/sampleOptions.cpp, `splitNameAndValue`): a shape spec is
`name:1x3x336x336` pairs separated by commas; each pair is split at its *last* colon, so names with dots
(`past_key_values.0.key`) need no quoting, and a name containing a colon is wrapped in single quotes
(`'input:0':1x3`, "Input names can be wrapped with escaped single quotes"). A comma, a quote or a `*` (a
wildcard since TensorRT 10) cannot be expressed in a name; 0-D inputs are written `name:scalar`.

Profile JSON (`--exportProfile`): a list whose first element is {"count": runs} followed by one object per
layer: {"name", "timeMs", "averageMs", "medianMs", "percentage"} (medianMs is absent in older versions).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from contract.errors import InputError, ManifestError
from contract.manifest import GraphSpec
from contract.names import BATCH, PAST, SEQUENCE, TOTAL

MAJORS = (10, 11)
PHASES = ("prefill", "decode")
PRECISIONS = ("onnx", "fp16", "int8", "best")
# TensorRT 10 flags per precision. "onnx": exactly the ONNX's own types (a strongly typed network). TensorRT 11
# networks are always strongly typed and its trtexec has neither these flags nor a need for --stronglyTyped
# (docs: "Migrating trtexec Usage from TensorRT 10.x to 11.x").
_FLAGS_10 = {"onnx": ["--stronglyTyped"], "fp16": ["--fp16"], "int8": ["--int8"], "best": ["--best"]}


@dataclass(frozen=True)
class Sizes:
    """The sizes a profile is built for; each becomes min/opt/max of one named axis."""

    batch: int = 1  # opt and run batch
    max_batch: int = 1
    seq_len: int = 96  # prompt tokens: prefill's opt length, decode's opt past length
    max_seq_len: int = 4096  # prompt + answer: the KV cache's longest length

    def __post_init__(self) -> None:
        if not 1 <= self.batch <= self.max_batch:
            raise InputError(f"--batch {self.batch} must be between 1 and --max-batch {self.max_batch}")
        if not 2 <= self.max_seq_len:
            raise InputError(f"--max-seq-len {self.max_seq_len} must be at least 2")
        if not 1 <= self.seq_len < self.max_seq_len:
            raise InputError(f"--seq-len {self.seq_len} must be between 1 and --max-seq-len - 1 "
                             f"({self.max_seq_len - 1}): decoding needs room for one more token")


def axis_ranges(sizes: Sizes, phase: str = "prefill") -> dict[str, tuple[int, int, int]]:
    """Named axis -> (min, opt, max). total = past + sequence holds at each of min, opt and max.

    prefill: the whole prompt in one call, empty cache.  decode: one token on a cache of `seq_len` tokens
    (opt) up to `max_seq_len - 1` (max). An empty past (0) is a valid TensorRT dimension.
    """
    if phase not in PHASES:
        raise InputError(f"phase {phase!r} is not one of {list(PHASES)}")
    s, m = sizes.seq_len, sizes.max_seq_len
    if phase == "prefill":
        sequence, past = (1, s, m), (0, 0, 0)
    else:
        sequence, past = (1, 1, 1), (0, s, m - 1)
    total = tuple(p + q for p, q in zip(past, sequence))
    return {BATCH: (1, sizes.batch, sizes.max_batch), SEQUENCE: sequence, PAST: past, TOTAL: total}


def has_phases(spec: GraphSpec) -> bool:
    """Whether a graph has a KV cache (prefill and decode are different profiles) or only a batch axis."""
    return any(isinstance(d, str) and d != BATCH for t in spec.inputs for d in t.shape)


@dataclass(frozen=True)
class ShapeProfile:
    """Per-input dims for trtexec: tensor name -> (min, opt, max) dims. Static inputs are left out."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def spec(self, which: int) -> str:
        """The --minShapes (0), --optShapes (1) / --shapes, or --maxShapes (2) value."""
        return ",".join(f"{quote_name(name)}:{_dims(dims[which])}" for name, dims in self.shapes.items())


def graph_profile(spec: GraphSpec, sizes: Sizes, phase: str = "prefill") -> ShapeProfile:
    """The profile of one graph from its manifest spec; an axis name nobody defined is a manifest error."""
    ranges = axis_ranges(sizes, phase)
    shapes = {}
    for tensor in spec.inputs:
        if all(isinstance(d, int) for d in tensor.shape):
            continue
        unknown = [d for d in tensor.shape if isinstance(d, str) and d not in ranges]
        if unknown:
            raise ManifestError(f"{spec.file} input {tensor.name!r} has dynamic axis {unknown[0]!r}; trtexec "
                                f"profiles know {sorted(ranges)}")
        shapes[tensor.name] = tuple(
            tuple(d if isinstance(d, int) else ranges[d][i] for d in tensor.shape) for i in range(3))
    return ShapeProfile(shapes)


def quote_name(name: str) -> str:
    """A tensor name as trtexec's shape options read it (split at the last colon, then at commas)."""
    if set(name) & set(",'*"):  # pair separator, quote, and the wildcard trtexec 10 expands in names
        raise InputError(f"tensor name {name!r} contains a comma, quote or '*', which trtexec's shape options "
                         "cannot express; rename it in the export")
    return f"'{name}'" if ":" in name else name


def _dims(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims) if dims else "scalar"


def precision_flags(precision: str, major: int) -> list[str]:
    if major not in MAJORS:
        raise InputError(f"TensorRT {major} is not supported; prunevlm targets TensorRT {MAJORS[0]} and {MAJORS[1]}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not one of {list(PRECISIONS)}")
    if major == 10:
        return list(_FLAGS_10[precision])
    if precision != "onnx":
        raise InputError(f"--precision {precision} does not exist in TensorRT 11 (trtexec removed --fp16, --int8 "
                         "and --best): put the precision in the ONNX (casts, Q/DQ) and use --precision onnx")
    return []


@dataclass(frozen=True)
class Command:
    """One trtexec invocation and where its per-layer profile will be written."""

    name: str  # "vision", "llm.prefill", "llm.1.decode" (a FEATHER / FastV block), "select.image.1", ...
    argv: tuple[str, ...]
    profile_json: Path

    def shell(self) -> str:
        """For copying into bash; a quoted tensor name reads better inside double quotes than shlex's '"'"'."""
        return " ".join(f'"{a}"' if "'" in a and not set(a) & set('"$`\\!') else shlex.quote(a) for a in self.argv)


def _profiling_flags(out_dir: Path, name: str) -> tuple[list[str], Path]:
    profile = out_dir / f"{name}.profile.json"
    return [f"--exportProfile={profile}", f"--exportLayerInfo={out_dir / f'{name}.layers.json'}",
            "--separateProfileRun"], profile


def onnx_commands(export_dir: Path, graphs: dict[str, GraphSpec], sizes: Sizes, major: int, out_dir: Path,
                  precision: str = "onnx", phases: Iterable[str] = PHASES, trtexec: str = "trtexec") -> list[Command]:
    """Build-and-profile commands, one per graph (two for a KV-cache graph: one per phase).

    One engine per phase, not one engine with two profiles (`--profile=0 ... --profile=1`, trtexec 10+): each
    profile then gets its own build tuned at its own opt shapes and its own per-layer table.
    """
    flags = precision_flags(precision, major)
    commands = []
    for graph, spec in graphs.items():
        for phase in (tuple(phases) if has_phases(spec) else (None,)):
            name = f"{graph}.{phase}" if phase else graph
            profile = graph_profile(spec, sizes, phase or "prefill")
            argv = [trtexec, f"--onnx={Path(export_dir) / spec.file}"]
            if profile.shapes:
                argv += [f"--minShapes={profile.spec(0)}", f"--optShapes={profile.spec(1)}",
                         f"--maxShapes={profile.spec(2)}", f"--shapes={profile.spec(1)}"]
            profiling, profile_json = _profiling_flags(out_dir, name)
            argv += flags + [f"--saveEngine={out_dir / f'{name}.plan'}", "--profilingVerbosity=detailed"] + profiling
            commands.append(Command(name, tuple(argv), profile_json))
    return commands


def engine_command(engine: Path, graph: str, spec: GraphSpec, sizes: Sizes, out_dir: Path, phase: str = "prefill",
                   trtexec: str = "trtexec") -> Command:
    """Profile an engine that is already built: run shapes only (its profile and precision are baked in)."""
    name = f"{graph}.{phase}" if has_phases(spec) else graph
    profile = graph_profile(spec, sizes, phase)
    argv = [trtexec, f"--loadEngine={engine}"]
    if profile.shapes:
        argv.append(f"--shapes={profile.spec(1)}")
    profiling, profile_json = _profiling_flags(out_dir, name)
    return Command(name, tuple(argv + profiling), profile_json)


# ---------------------------------------------------------------- which TensorRT

def parse_trt_version(text: str) -> tuple[int, int, int] | None:
    """`&&&& RUNNING TensorRT.trtexec [TensorRT v100300]` -> (10, 3, 0); dotted banners (v8.6.1) too."""
    match = re.search(r"TensorRT v(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if match is None:
        return None
    if match.group(2) is None and len(match.group(1)) >= 5:  # MMmmpp packed: 100300, 110500
        packed = int(match.group(1))
        return packed // 10000, packed // 100 % 100, packed % 100
    return tuple(int(g or 0) for g in match.groups())  # type: ignore[return-value]


def detect_version(trtexec: str | None) -> tuple[int, int, int] | None:
    """The TensorRT version of trtexec on PATH (its banner), else of the importable `tensorrt` module."""
    if trtexec is not None:
        try:
            done = subprocess.run([trtexec, "--version"], capture_output=True, text=True, timeout=120)
            found = parse_trt_version(done.stdout + done.stderr)  # older trtexec exit non-zero here
            if found:
                return found
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        import tensorrt  # only to read its version: no builder, no GPU work
    except Exception:  # not installed, or installed without its CUDA libraries
        return None
    return parse_trt_version(f"TensorRT v{tensorrt.__version__}")


def resolve_major(requested: int | None, detected: tuple[int, int, int] | None) -> int:
    """The major version to write commands for: what is installed, or what the user asked for when nothing is."""
    if detected is not None:
        found = ".".join(map(str, detected))
        if detected[0] not in MAJORS:
            raise InputError(f"TensorRT {found} is installed; prunevlm's commands target TensorRT 10 and 11")
        if requested is not None and requested != detected[0]:
            raise InputError(f"--version {requested} contradicts the installed TensorRT {found}")
        return detected[0]
    if requested is None:
        raise InputError("trtexec is not on PATH and tensorrt is not importable: pass --version 10 or --version 11")
    if requested not in MAJORS:
        raise InputError(f"--version {requested} is not one of {list(MAJORS)}")
    return requested


# ---------------------------------------------------------------- the profile JSON

@dataclass(frozen=True)
class LayerTime:
    name: str
    total_ms: float  # over all profiled runs
    average_ms: float  # per run
    median_ms: float | None  # absent from older trtexec versions
    percentage: float  # of the whole network's time


@dataclass(frozen=True)
class LayerProfile:
    runs: int
    layers: tuple[LayerTime, ...]

    def top(self, n: int) -> list[LayerTime]:
        return sorted(self.layers, key=lambda layer: layer.average_ms, reverse=True)[:n]


def parse_profile(data: Any, where: str = "profile") -> LayerProfile:
    """trtexec's --exportProfile list -> LayerProfile; anything else is refused naming the bad element."""
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "count" not in data[0]:
        raise InputError(f"{where} is not a trtexec --exportProfile file: expected a list starting with {{\"count\": N}}")
    layers = []
    for index, item in enumerate(data[1:], start=1):
        try:
            median = item.get("medianMs")
            layers.append(LayerTime(str(item["name"]), float(item["timeMs"]), float(item["averageMs"]),
                                    None if median is None else float(median), float(item["percentage"])))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: element {index} is not a layer record ({type(exc).__name__}: {exc})") from None
    return LayerProfile(int(data[0]["count"]), tuple(layers))


def read_profile(path: str | Path) -> LayerProfile:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"profile file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    return parse_profile(data, str(path))


def format_top_layers(profile: LayerProfile, n: int = 10) -> str:
    """The N slowest layers by average time per run, with the share of the network they account for."""
    if n < 1:
        raise InputError(f"--top {n} must be at least 1")
    top = profile.top(n)
    rows = [("#", "avg ms", "median ms", "%", "layer")] + [
        (str(i), f"{t.average_ms:.4f}", "-" if t.median_ms is None else f"{t.median_ms:.4f}", f"{t.percentage:.1f}",
         t.name) for i, t in enumerate(top, start=1)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    total = sum(t.average_ms for t in profile.layers)
    share = sum(t.percentage for t in top)
    lines.append(f"top {len(top)} of {len(profile.layers)} layers: {share:.1f}% of {total:.4f} ms per run "
                 f"({profile.runs} runs)")
    return "\n".join(lines)

"""`python -m engines check EXPORT_DIR [--images DIR]`: every engine against ONNX Runtime, through Polygraphy.

    photos (scikit-image's by default) --the runtime's preprocessing--> pixel_values per photo
    vision engine   vs its ONNX (ONNX Runtime, CPU)  on pixel_values
    projector       vs its ONNX                      on ONNX Runtime's vision outputs
    llm prefill     vs its ONNX                      on the spliced prompt + image (the runtime's own splice)
    llm decode      vs its ONNX                      one token on ONNX Runtime's prefill cache
    FEATHER / FastV: each block (llm.0, llm.1, ...) prefill and decode, and each select graph, on the feeds
                    ONNX Runtime's own run gave it (the previous block's hidden states, its kept tokens)
    -> Comparator.run([TrtRunner, OnnxrtRunner], feeds) -> Comparator.compare_accuracy(compare_func=...)
       float outputs: SimpleCompareFunc (CompareFunc.simple) with per-output atol/rtol by the engine's precision;
       index outputs (keep_indices, keep_slots): compared as sets, |A n B| / K >= MIN_TOPK_AGREEMENT
    -> one table: max and mean |engine - onnxruntime| per output, top-k agreement, pass/fail (exit 1 on a fail)

Each engine is compared with the ONNX file it was built from (its metadata says which: the Q/DQ graph for
int8/fp8), so the check isolates what TensorRT did. Polygraphy's API: polygraphy.backend.trt
(EngineFromPath, TrtRunner), polygraphy.backend.onnxrt (SessionFromOnnx, OnnxrtRunner),
polygraphy.comparator (Comparator.run / compare_accuracy, SimpleCompareFunc, IterationResult):
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/polygraphy/index.html
The TensorRT side needs a GPU and is unverified here; the ONNX Runtime side, the comparison and the table
are tested with two ONNX Runtime runners (tests/engines/test_check.py).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from contract import engine_meta, names
from contract.compare import MIN_TOPK_AGREEMENT, format_table, max_abs_diff, topk_agreement
from contract.errors import InputError
from contract.manifest import Manifest
from engines import trtexec
from engines.plan import require_standard
from runtime.backends.base import to_numpy

# (atol, rtol) per engine precision, Polygraphy's element-wise test: |a - b| <= atol or |a - b| / |b| <= rtol.
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "int8": (2e-1, 1e-1), "fp8": (2e-1, 1e-1)}
SET_OUTPUTS = (names.KEEP_INDICES, names.KEEP_SLOTS)  # keep_slots: members ascending, then filler
PROMPT = "Describe the image in detail."


@dataclass(frozen=True)
class Row:
    graph: str  # the engine key of `feeds`: "vision", "llm.prefill", "llm.1.decode", "select.image.1", ...
    output: str
    max_abs: float  # over every compared input; for sets: 1 - worst agreement
    mean_abs: float
    tolerance: str
    ok: bool
    agreement: float | None = None  # top-k outputs


def skimage_photos() -> dict[str, np.ndarray]:
    """Real photographs that scikit-image ships (HxWx3 uint8), landscape and portrait."""
    try:
        import skimage.data
    except ImportError:
        raise InputError("no --images DIR and scikit-image is not installed (pip install scikit-image)") from None
    return {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}


def read_images(directory: Path) -> dict[str, object]:
    if not directory.is_dir():
        raise InputError(f"--images {str(directory)!r} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    if not files:
        raise InputError(f"--images {str(directory)!r} has no .jpg/.png/.bmp/.webp files")
    return {p.name: p for p in files}


def feeds(export_dir: Path, photos: dict[str, object], prompt: str = PROMPT) -> dict[str, list[dict]]:
    """Inputs per engine (`key`: "vision", "llm.prefill", "llm.decode", "llm.0.prefill", "select.image.1", ...),
    from the photos preprocessed and spliced exactly as the runtime does (an ONNX Runtime Pipeline),
    downstream graphs fed ONNX Runtime's outputs. The LLM graphs' feeds are the ones the runtime's own
    prefill and first decode step give them (each block and select graph recorded as it is called)."""
    from runtime.pipeline import Pipeline, Timings
    from runtime.preprocess import load_image, preprocess

    pipe = Pipeline.load(export_dir, providers=["CPUExecutionProvider"])
    manifest = pipe.manifest
    out: dict[str, list[dict]] = {}
    for name, modality in manifest.modalities.items():
        for photo in photos.values():
            if modality.content_type == "image":
                pixels = pipe.layouts[name].tiles(photo)[0]  # [S, 3, H, W]: the layout's own tiles
            else:  # a video modality: the photo as one frame
                pixels = preprocess([load_image(photo)], modality.preprocess)
            vision = pipe.runners[modality.vision].infer({names.PIXEL_VALUES: pixels})
            out.setdefault(modality.vision, []).append({names.PIXEL_VALUES: pixels})
            out.setdefault(modality.projector, []).append({k: vision[k] for k in (names.IMAGE_FEATURES, names.KEEP_INDICES)})
    image = next((m for m, s in manifest.modalities.items() if s.content_type == "image"), None)
    recorders: dict[str, _Recorder] = {}  # graph key -> what stands in for its runner in the Generator
    blocks = []
    for i, (block, (key, _)) in enumerate(zip(pipe.generator.blocks, manifest.blocks())):
        recorders[key] = _Recorder(block.runner)
        select = {}
        for modality, runner in block.select.items():  # the select graphs of the prune point after block i
            select[modality] = recorders[manifest.llm_pruning.select[modality][i]] = _Recorder(runner)
        blocks.append(replace(block, runner=recorders[key], select=select))
    pipe.generator.blocks = blocks
    for photo in photos.values() if image else ():
        ids = [pipe.prompt_ids(prompt, image)]
        visual, keep = pipe.encode([photo], image, Timings())
        state, logits, _ = pipe.prefill(ids, visual, keep, image)
        _collect(recorders, manifest, "prefill", out)
        pipe.generator.decode_one_token(state, logits.argmax(axis=-1))
        _collect(recorders, manifest, "decode", out)
    return out


class _Recorder:
    """Stands in for one runner of the Generator: keeps a host copy of every feed, then runs the runner."""

    def __init__(self, runner):
        self.runner, self.spec, self.calls = runner, runner.spec, []

    def infer(self, feeds: dict) -> dict:
        self.calls.append({k: np.array(to_numpy(v)) for k, v in feeds.items()})
        return self.runner.infer(feeds)

    def infer_bound(self, feeds: dict) -> dict:
        self.calls.append({k: np.array(to_numpy(v)) for k, v in feeds.items()})
        return self.runner.infer_bound(feeds)


def _collect(recorders: dict[str, _Recorder], manifest: Manifest, phase: str, out: dict[str, list[dict]]) -> None:
    """Move the recorded feeds into `out` under each engine's key: GRAPH.PHASE for a KV-cache graph (one
    call per phase), GRAPH for a select graph (it runs at prefill only)."""
    for graph, recorder in recorders.items():
        if recorder.calls:
            key = f"{graph}.{phase}" if trtexec.has_phases(manifest.graphs[graph]) else graph
            out.setdefault(key, []).extend(recorder.calls)
            recorder.calls = []


def graph_of(key: str) -> tuple[str, str | None]:
    """An engine key of `feeds` -> (graph key, profile name or None): "llm.0.decode" -> ("llm.0", "decode")."""
    graph, _, phase = key.rpartition(".")
    return (graph, phase) if phase in trtexec.PHASES else (key, None)


class SetAwareCompare:
    """A Polygraphy compare_func: float outputs through CompareFunc.simple with per-output tolerances, index
    outputs as sets (top-k order is not meaningful, its membership is)."""

    def __init__(self, atol: dict[str, float], rtol: dict[str, float], set_outputs: Sequence[str] = SET_OUTPUTS):
        from polygraphy.comparator import SimpleCompareFunc  # CompareFunc.simple's class (the factory is deprecated)

        self.simple = SimpleCompareFunc(atol=atol, rtol=rtol)
        self.set_outputs = tuple(set_outputs)

    def __call__(self, result0, result1):
        from polygraphy.comparator import IterationResult

        floats = [IterationResult({k: v for k, v in r.items() if k not in self.set_outputs}, runner_name=r.runner_name)
                  for r in (result0, result1)]
        verdicts = OrderedDict(self.simple(*floats))
        for name in self.set_outputs:
            if name in result0 and name in result1:
                verdicts[name] = topk_agreement(_array(result0[name]), _array(result1[name])) >= MIN_TOPK_AGREEMENT
        return verdicts


def _array(value) -> np.ndarray:
    return np.asarray(value.load() if hasattr(value, "load") else value)


def compare(name: str, runners: list, data: list[dict], atol: float, rtol: float) -> list[Row]:
    """Run `data` through both runners with Polygraphy's Comparator and judge each output with its verdict;
    the max/mean errors and top-k agreement for the table are computed from the same results."""
    from polygraphy.comparator import Comparator

    results = Comparator.run(runners, data_loader=data)
    (name0, first), (name1, second) = results[0], results[1]
    outputs = list(first[0].keys())
    compare_func = SetAwareCompare({k: atol for k in outputs}, {k: rtol for k in outputs})
    accuracy = Comparator.compare_accuracy(results, compare_func=compare_func)[0]  # one compare_func, one result
    verdict = {out: all(bool(iteration[out]) for iteration in accuracy[(name0, name1)]) for out in outputs}
    rows = []
    for output in outputs:
        pairs = [(_array(a[output]), _array(b[output])) for a, b in zip(first, second)]
        if output in SET_OUTPUTS:
            agreements = [topk_agreement(a, b) for a, b in pairs]
            rows.append(Row(name, output, 1 - min(agreements), 1 - float(np.mean(agreements)),
                            f"agreement >= {MIN_TOPK_AGREEMENT}", verdict[output], min(agreements)))
            continue
        diffs = [np.abs(a.astype(np.float64) - b) for a, b in pairs]
        rows.append(Row(name, output, max(max_abs_diff(a, b) for a, b in pairs),
                        float(np.mean([d.mean() if d.size else 0.0 for d in diffs])),
                        f"atol {atol:g} or rtol {rtol:g}", verdict[output]))
    return rows


def trt_runners(export_dir: Path, manifest: Manifest) -> Callable[[str], tuple[list, str]]:
    """graph key -> ([TrtRunner, OnnxrtRunner], precision), for the engines of `export_dir`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    from runtime.backends.cuda import cuda
    from runtime.backends.tensorrt import import_tensorrt

    trt = import_tensorrt()
    device = cuda().device()
    engines = {}

    def make(key: str):
        graph, phase = graph_of(key)
        meta = engine_meta.check_engine(export_dir, graph, trt.__version__, device.compute_capability)
        if graph not in engines:  # one deserialized engine per graph, shared by its profiles' runners
            engines[graph] = EngineFromPath(str(engine_meta.engine_path(export_dir, graph)))()
        profile = [p["name"] for p in meta.profiles].index(phase) if phase else None
        level = None
        if meta.options["precision"] == "fp8":  # ONNX Runtime runs FP8 Q/DQ only without graph optimizations
            import onnxruntime as ort
            level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        onnx = SessionFromOnnx(str(export_dir / meta.options["onnx"]), providers=["cpu"],
                               graph_optimization_level=level)
        return [TrtRunner(engines[graph], name=f"trt-{key}", optimization_profile=profile),
                OnnxrtRunner(onnx, name=f"onnxrt-{key}")], meta.options["precision"]

    return make


def check(export_dir: Path, photos: dict[str, object], runners=None) -> list[Row]:
    """Every engine of `export_dir` against ONNX Runtime. `runners(key) -> ([runner, reference], precision)`:
    TensorRT by default; the tests pass ONNX Runtime runners."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-comparison logging would bury the table
    manifest = Manifest.read(export_dir)
    if runners is None:
        require_standard(manifest, export_dir)
        for graph in manifest.graphs:
            engine_meta.check_engine(export_dir, graph)  # missing or stale: said before TensorRT loads
        runners = trt_runners(export_dir, manifest)
    rows = []
    for key, data in feeds(export_dir, photos).items():
        pair, precision = runners(key)
        rows += compare(key, pair, data, *TOLERANCES[precision])
    return rows


def format_rows(rows: list[Row]) -> str:
    table = [("engine", "output", "max |trt-ort|", "mean |trt-ort|", "tolerance", "result")]
    presents = [r for r in rows if r.output.startswith("present.")]
    for r in [r for r in rows if not r.output.startswith("present.")]:
        if r.agreement is not None:
            table.append((r.graph, r.output, f"agreement {r.agreement:.3f}", "-", r.tolerance, "ok" if r.ok else "FAIL"))
        else:
            table.append((r.graph, r.output, f"{r.max_abs:.2e}", f"{r.mean_abs:.2e}", r.tolerance, "ok" if r.ok else "FAIL"))
    for graph in dict.fromkeys(r.graph for r in presents):
        group = [r for r in presents if r.graph == graph]
        table.append((graph, f"present.* ({len(group)})", f"{max(r.max_abs for r in group):.2e}",
                      f"{np.mean([r.mean_abs for r in group]):.2e}", group[0].tolerance,
                      "ok" if all(r.ok for r in group) else "FAIL"))
    lines = [format_table(table, indent="")]
    failed = sum(not r.ok for r in rows)
    lines.append(f"check: {len(rows) - failed} of {len(rows)} outputs within tolerance")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line (python -m engines check)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="an export directory with built engines")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="photos to check on (default: scikit-image's astronaut, chelsea, coffee, rocket)")


def run(args: argparse.Namespace) -> int:
    """Exit code 0: every output within tolerance; 1: some output is not; 2: bad input."""
    photos = read_images(args.images) if args.images is not None else skimage_photos()
    rows = check(args.export_dir, photos)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1

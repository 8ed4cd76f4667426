"""How far the quantized graphs are from the fp32 ones, on held-out photos, with ONNX Runtime on CPU.

    photo --runtime layout--> pixel_values --vision fp32--> feats_a, kept_a --projector fp32--> embeds_a
                                           --vision q----> feats_b, kept_b --projector q----> embeds_b
    (a graph that was not quantized runs fp32 on both sides)

    top-k agreement      |kept_a & kept_b| / K per sub-image (FasterVLM's selection, the thing to protect)
    cosine, shared       embeds_a vs embeds_b for the patches both sides kept: the feature and projector
                         error alone
    cosine, as fed       row by row, embeds as handed to the LLM: also counts a changed selection (a swapped
                         token shifts the sorted rows after it, so this falls faster than the agreement)
    llm                  prefill logits of each side's own chain on the same prompt: cosine, same argmax
    latency              vision graph, batch 1, fp32 and quantized runs interleaved, median

ONNX Runtime's CPU kernels run FP8 Q/DQ graphs only with graph optimizations off (simulated, slow): FP8
numbers here are an accuracy check, their latency says nothing about a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from calibration import data
from contract import names
from contract.compare import topk_agreement
from runtime.layout import make_layout

# scikit-image's real photographs, none of which the tests calibrate on (chelsea() and cat() are the same
# photo, so cat is not listed twice).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def skimage_photos() -> dict[str, np.ndarray] | None:
    """The held-out photos scikit-image ships, or None when it is not installed."""
    try:
        import skimage.data
    except ImportError:
        return None
    return {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}


def session(path: Path, fp8: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if fp8:  # ORT's optimizer cannot fuse FP8 Q/DQ on CPU and fails; unoptimized, the kernels run
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(export_dir: Path, manifest, pipe, graphs: dict[str, tuple[Path, Path]], fp8: bool,
            held_out: data.CalibrationSet, prompt: str, latency_runs: int) -> dict:
    """graphs: role ('vision', 'projector', optionally 'llm') -> (fp32 file, quantized file); a role that was
    not quantized has its fp32 file on both sides. `pipe` (a fp32 Pipeline) builds the LLM's prompts."""
    sides = {}  # role -> (fp32 session, quantized session: the same one when the role was not quantized)
    for role, (fp32, quant) in graphs.items():
        base = session(fp32)
        sides[role] = (base, session(quant, fp8) if quant != fp32 else base)
    vision_input = sides["vision"][0].get_inputs()[0].name
    starts = np.concatenate([[0], np.cumsum(held_out.tiles)])
    layout = make_layout(manifest.modalities[names.IMAGE], manifest, Path(export_dir))
    agreement, shared, rows, visual = [], [], [], ([], [])
    for image in range(len(held_out.names)):
        pixels = held_out.pixel_values[starts[image]:starts[image + 1]]  # [S, 3, H, W]
        for side in (0, 1):
            feats, kept = sides["vision"][side].run([names.IMAGE_FEATURES, names.KEEP_INDICES], {vision_input: pixels})
            embeds = sides["projector"][side].run(None, {names.IMAGE_FEATURES: feats, names.KEEP_INDICES: kept})[0]
            visual[side].append(layout.assemble(embeds, kept, tuple(held_out.sizes[image])))
            if side == 0:
                kept_a, embeds_a = kept, embeds
        agreement.append(topk_agreement(kept, kept_a))
        shared.append(np.mean([_shared_cosine(*pair) for pair in zip(kept_a, embeds_a, kept, embeds)]))
        rows.append(float(np.mean(_cosine(embeds_a, embeds))))
    metrics = {
        "images": list(held_out.names),
        "keep": int(kept_a.shape[-1]),
        "topk_agreement": _summary(agreement, held_out.names),
        "embed_cosine_shared": _summary(shared, held_out.names),
        "embed_cosine_rows": _summary(rows, held_out.names),
    }
    if names.LLM in sides:
        logits = [sides[names.LLM][side].run([names.LOGITS], data.llm_feeds(pipe, visual[side], prompt))[0] for side in (0, 1)]
        metrics[names.LLM] = {
            "prompt": prompt,
            "logits_cosine": _summary(_cosine(*logits), held_out.names),
            "top1_agreement": float(np.mean(logits[0].argmax(-1) == logits[1].argmax(-1))),
        }
    if graphs["vision"][0] != graphs["vision"][1]:
        metrics["latency_ms"] = _latency(sides["vision"], {vision_input: held_out.pixel_values[:1]}, latency_runs, fp8)
    return metrics


def _latency(pair: tuple, feed: dict, runs: int, fp8: bool) -> dict:
    """Median ms of fp32 and quantized runs, interleaved so that load from other processes hits both."""
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(runs + 2):
        for side in (0, 1):
            start = time.perf_counter()
            pair[side].run(None, feed)
            if index >= 2:  # two warm-up runs: allocations, thread pool start
                times[side].append(time.perf_counter() - start)
    fp32, quant = (float(np.median(t)) * 1e3 for t in times)
    return {
        "fp32": round(fp32, 3),
        "quantized": round(quant, 3),
        "speedup": round(fp32 / quant, 3),
        "runs": runs,
        "batch": 1,
        "session": "ORT CPU, quantized graph unoptimized (FP8 simulation)" if fp8 else "ORT CPU, default optimizations",
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1) + 1e-30)


def _shared_cosine(kept_a: np.ndarray, embeds_a: np.ndarray, kept_b: np.ndarray, embeds_b: np.ndarray) -> float:
    """Mean cosine of the embeddings of the patches both sides kept. kept [K], embeds [K, D]."""
    common, at_a, at_b = np.intersect1d(kept_a, kept_b, return_indices=True)
    return float(np.mean(_cosine(embeds_a[at_a], embeds_b[at_b]))) if len(common) else 0.0


def _summary(values, names) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "min": float(np.min(values)),
            "per_image": {str(n): round(v, 6) for n, v in zip(names, values)}}

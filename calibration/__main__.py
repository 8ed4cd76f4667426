"""python -m calibration EXPORT_DIR --images DIR --precision int8|fp8 [--graphs ...] [--target ...]"""

from __future__ import annotations

import sys
from pathlib import Path

from calibration.options import DEFAULT_GRAPHS, DEFAULT_PROMPT, CalibrationOptions
from contract import names
from contract.cli import ArgumentParser, run

AGREEMENT_TARGET = 0.90  # the bar for top-k agreement at K=32 on real photos


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m calibration",
        description="Post-training quantization of an export directory's graphs with NVIDIA ModelOpt: writes "
        "Q/DQ ONNX graphs for TensorRT next to the fp32 ones (vision.int8.onnx, ...), the calibration set "
        "(calibration-<sha>.npz, to rebuild the same graphs) and calibration.json (what was quantized, what "
        "stayed fp32 and why, metrics). Only Linear layers are quantized; FasterVLM's [CLS]-score path, "
        "LayerNorm, Softmax and attention matmuls stay fp32. Then prints top-k agreement, embedding cosine "
        "and latency against the fp32 graphs on held-out photos (ONNX Runtime, CPU).",
        epilog="example: python -m calibration exports/llava15-k32 --images photos/ --precision int8",
    )
    p.add_argument("export_dir", type=Path, help="directory written by python -m export")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="calibration photos (every file in DIR must be an image; a few dozen typical ones of "
                   "the deployment's scenes), preprocessed exactly as the runtime does")
    p.add_argument("--calibration-data", type=Path, default=None, metavar="NPZ",
                   help="reuse the calibration set of an earlier run (calibration-<sha>.npz) instead of --images")
    p.add_argument("--precision", required=True, help="int8 (any TensorRT GPU, Jetson Orin included) or fp8 "
                   "(Ada / Hopper, SM 8.9+)")
    p.add_argument("--graphs", default=",".join(DEFAULT_GRAPHS),
                   help="comma-separated graphs to quantize: vision, projector, llm (default vision,projector; "
                   "llm is calibrated on prefill inputs of --prompt with each photo)")
    p.add_argument("--target", default=None, help="GPU the graphs are for: jetson-orin (SM 8.7, no FP8), ada, "
                   "hopper; recorded in calibration.json, and fp8 is refused for jetson-orin")
    p.add_argument("--method", default=None, help="activation calibration: entropy or max (default: ModelOpt's, "
                   "entropy for int8, max for fp8)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where the quantized graphs, calibration set and calibration.json go (default: EXPORT_DIR)")
    p.add_argument("--eval-images", type=Path, default=None, metavar="DIR",
                   help="held-out photos for the metrics (default: scikit-image's sample photos when installed)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the metrics")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="prompt around the image for the LLM's calibration and metrics (with --graphs llm)")
    p.add_argument("--latency-runs", type=int, default=10, metavar="N", help="timed runs for the latency medians (default 10)")
    p.add_argument("--verbose", action="store_true", help="show ModelOpt's and ONNX Runtime's own output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        options = CalibrationOptions(
            export_dir=args.export_dir, precision=args.precision, images=args.images,
            calibration_data=args.calibration_data, graphs=tuple(g.strip() for g in args.graphs.split(",") if g.strip()),
            out=args.out, target=args.target, method=args.method, eval_images=args.eval_images,
            evaluate=args.evaluate, prompt=args.prompt, latency_runs=args.latency_runs,
        )
        from calibration import api  # onnx, ModelOpt: only once the options are valid

        entry = api.run(options, api.Log(verbose=args.verbose))
        print(table(entry))
        return 0

    return run(body, args.debug)


def table(entry: dict) -> str:
    """The graphs written and the metrics, as a small fixed-width table."""
    precision = entry["precision"]
    lines = [f"{'graph':<10} {'file':<24} {'Q/DQ':>9}  {'quantized':>9}  {'kept fp32 (linear)':<20}"]
    for role, graph in entry["graphs"].items():
        qdq = f"{graph['qdq_nodes']['QuantizeLinear']}/{graph['qdq_nodes']['DequantizeLinear']}"
        lines.append(f"{role:<10} {graph['file']:<24} {qdq:>9}  {len(graph['quantized']):>9}  "
                     f"{len(graph['excluded'])} ({_kinds(graph['excluded'])})")
    metrics = entry["metrics"]
    if metrics is None:
        lines.append("\nno metrics (--no-eval, or no held-out photos: pass --eval-images DIR)")
        return "\n".join(lines)
    overlap = metrics["calibration_overlap"]
    lines.append(f"\nheld-out photos ({len(metrics['images'])}): {', '.join(metrics['images'])}"
                 + (f"  WARNING: also in the calibration set: {', '.join(overlap)}" if overlap else ""))
    agreement = metrics["topk_agreement"]
    verdict = "ok" if agreement["mean"] >= AGREEMENT_TARGET else "BELOW TARGET"
    lines += [
        f"{'metric':<40} {'mean':>8} {'min':>8}",
        f"{'top-k agreement |A&B|/K (K=' + str(metrics['keep']) + ')':<40} "
        f"{agreement['mean']:>8.4f} {agreement['min']:>8.4f}   target >= {AGREEMENT_TARGET:.2f}: {verdict}",
        f"{'embedding cosine, tokens both kept':<40} {metrics['embed_cosine_shared']['mean']:>8.4f} "
        f"{metrics['embed_cosine_shared']['min']:>8.4f}",
        f"{'embedding cosine, rows as fed to the LLM':<40} {metrics['embed_cosine_rows']['mean']:>8.4f} "
        f"{metrics['embed_cosine_rows']['min']:>8.4f}",
    ]
    if names.LLM in metrics:
        llm = metrics[names.LLM]
        lines.append(f"{'llm prefill logits cosine':<40} {llm['logits_cosine']['mean']:>8.4f} {llm['logits_cosine']['min']:>8.4f}")
        lines.append(f"{'llm next token same as fp32':<40} {llm['top1_agreement']:>8.4f}")
    if "latency_ms" in metrics:
        latency = metrics["latency_ms"]
        lines.append(f"vision latency, batch 1 (median of {latency['runs']}): fp32 {latency['fp32']:.1f} ms, "
                     f"{precision} {latency['quantized']:.1f} ms, {latency['speedup']:.2f}x  [{latency['session']}]")
    return "\n".join(lines)


def _kinds(excluded: list[dict]) -> str:
    reasons = {"score": "score path", "vocabulary": "lm head"}
    found = sorted({label for e in excluded for key, label in reasons.items() if key in e["reason"]})
    return ", ".join(found) or "none"


if __name__ == "__main__":
    sys.exit(main())

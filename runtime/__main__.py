"""python -m runtime EXPORT_DIR --image PATH (or --video PATH) --prompt TEXT: answer a question about an image
(or a video, on exports that take videos)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from contract.cli import ArgumentParser, run
from contract.errors import InputError


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m runtime",
        description="Run an export directory (python -m export ...) on an image (or a video) and a prompt with ONNX "
        "Runtime. Prints the answer as it is generated, then per-stage timings.",
        epilog='example: python -m runtime exports/llava15-k32 --image cat.jpg --prompt "What is in the picture?"',
    )
    p.add_argument("export_dir", type=Path, help="directory written by python -m export")
    item = p.add_mutually_exclusive_group(required=True)
    item.add_argument("--image", help="image file (JPEG, PNG, ...); grayscale/RGBA are converted to RGB")
    item.add_argument("--video", help="video file (MP4, AVI, WebM, ...; decoded with PyAV) for exports that take "
                      "videos (video-llava): the export's frame count is sampled uniformly")
    p.add_argument("--prompt", required=True, help="question or instruction about the image")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    p.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or trt: the TensorRT engines "
                   "built by `python -m engines build EXPORT_DIR`")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, kept indices, timings)")
    p.add_argument("--save-kept", type=Path, default=None, metavar="PNG",
                   help="save the image as the model saw it, with the kept patches outlined and the rest dimmed")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(lambda: _run(args), args.debug)


def _run(args) -> int:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.export_dir, backend=args.backend, threads=args.threads)
    modality, source = ("video", args.video) if args.video is not None else ("image", args.image)
    if modality not in pipe.manifest.modalities:
        raise InputError(f"--{modality}: the export in {str(args.export_dir)!r} ({pipe.manifest.family}) takes "
                         f"{' or '.join(sorted(pipe.manifest.modalities))} input only")
    stream = None if args.json else (lambda row, piece: print(piece, end="", flush=True))
    result = pipe.generate(
        source, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_text=stream, modality=modality,
    )
    if args.save_kept is not None:
        from runtime.visualize import save_kept

        pixels, _ = pipe.layouts[modality].tiles(source)  # [S, 3, H, W] (tiles, frames): drawn side by side
        save_kept(args.save_kept, pixels, result.kept_indices.reshape(len(pixels), -1),
                  pipe.modality(modality).preprocess, pipe.manifest.method.grid)
    method = pipe.manifest.method
    if args.json:
        print(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "kept_indices": result.kept_indices.tolist(),
            "method": {"name": method.name, "keep": method.keep, "num_patches": method.num_patches},
            "prompt_tokens": result.prompt_tokens,
            "timings": result.timings.as_dict(),
        }, indent=2))
        return 0
    t = result.timings
    print()
    print(
        f"-- {method.name} kept {method.keep}/{method.num_patches} visual tokens"
        f"{' per sub-image' if result.kept_indices.ndim > 1 else ''} | prompt {result.prompt_tokens} tokens | "
        f"{len(result.token_ids)} generated ({result.finish_reason})",
        file=sys.stderr,
    )
    print(
        f"-- preprocess {t.preprocess * 1e3:.1f} ms | vision {t.vision * 1e3:.1f} ms | projector {t.projector * 1e3:.1f} ms"
        f" | prefill {t.prefill * 1e3:.1f} ms | first token {t.time_to_first_token * 1e3:.1f} ms"
        f" | decode {t.decode_tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    if args.save_kept is not None:
        print(f"-- kept patches drawn in {args.save_kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

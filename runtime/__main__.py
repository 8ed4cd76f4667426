"""python -m runtime EXPORT_DIR --image PATH (or --video PATH) --prompt TEXT: answer a question about an image
(or a video, on exports that take videos)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from contract.cli import ArgumentParser, run
from contract.errors import InputError, UserError
from runtime.pipeline import MAX_THREADS


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m runtime",
        description="Run an export directory (python -m export ...) on an image (or a video) and a prompt with ONNX "
        "Runtime. Prints the answer as it is generated, then per-stage timings.",
        epilog='example: python -m runtime exports/llava15-k32 --image cat.jpg --prompt "What is in the picture?"',
    )
    p.add_argument("export_dir", type=Path, help="directory written by python -m export")
    item = p.add_mutually_exclusive_group()  # one of them is required unless --verify comes alone (main)
    item.add_argument("--image", help="image file (JPEG, PNG, ...); grayscale/RGBA are converted to RGB")
    item.add_argument("--video", help="video file (MP4, AVI, WebM, ...; decoded with PyAV) for exports that take "
                      "videos (video-llava): the export's frame count is sampled uniformly")
    item.add_argument("--camera", type=int, metavar="INDEX", help="perception loop on a camera (OpenCV index, "
                      "pip install 'prunevlm[camera]'): one answer per frame the model has time for, newest frame first")
    item.add_argument("--video-stream", metavar="URL_OR_FILE", help="perception loop on a stream OpenCV opens (RTSP, "
                      "HTTP, GStreamer pipeline) or a video file (PyAV; every frame, or its own rate with --realtime)")
    item.add_argument("--frames", type=Path, metavar="DIR", help="perception loop on the images of a folder, in name order")
    p.add_argument("--prompt", help="question or instruction about the image (required with --image/--video)")
    loop = p.add_argument_group("perception loop (--camera, --video-stream, --frames)")
    loop.add_argument("--choices", type=_choices, default=None, metavar="A,B,...",
                      help="answer with one of these (one prefill, no decode), with each one's probability")
    loop.add_argument("--deadline-ms", type=float, default=None, metavar="N",
                      help="latency budget per answer from taking the frame: no decode step starts once it is spent")
    loop.add_argument("--every", type=float, default=0.0, metavar="S", help="at most one query every S seconds")
    loop.add_argument("--realtime", action="store_true", help="play a --video-stream file at its own frame rate "
                      "(frames the model has no time for are dropped, as with a camera)")
    loop.add_argument("--overlap", action="store_true",
                      help="encode the next frame while the current one decodes (see README: slower on 2 cores)")
    loop.add_argument("--reconnects", type=int, default=3, metavar="N",
                      help="camera/stream reopen attempts after a failed read before giving up (default 3)")
    loop.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                      help="append one JSON object per answer to FILE instead of printing one line per answer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    p.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    p.add_argument("--threads", type=_threads, default=0,
                   help=f"ONNX Runtime intra-op threads, 0 to {MAX_THREADS} (default 0: all cores)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or trt: the TensorRT engines "
                   "built by `python -m engines build EXPORT_DIR`")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, kept indices, timings)")
    p.add_argument("--save-kept", type=Path, default=None, metavar="PNG",
                   help="save the image as the model saw it, with the kept patches outlined and the rest dimmed "
                   "(FEATHER / FastV: the tokens kept at the first prune point outlined, at the last one filled)")
    p.add_argument("--verify", action="store_true", help="first check every file of the export against the sha256 "
                   "the manifest records (reads the whole export); alone, without --image/--video: only check")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _choices(text: str) -> list[str]:
    return [c.strip() for c in text.split(",")]


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..{MAX_THREADS} (0: all cores)")
    return value


def _write(text: str, end: str = "\n") -> None:
    """Print to stdout now; a closed pipe (`| head -c1`) or a full disk (`> /dev/full`) is one error line.

    stdout is then pointed at /dev/null, so the interpreter's own flush at exit cannot raise again."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except OSError as exc:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass  # stdout has no file descriptor (replaced by the caller): nothing buffered will be flushed
        reason = "it was closed (broken pipe)" if isinstance(exc, BrokenPipeError) else exc.strerror or str(exc)
        raise UserError(f"cannot write the answer to standard output: {reason}") from None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    loop = args.camera is not None or args.video_stream is not None or args.frames is not None
    alone = args.verify and args.image is None and args.video is None and not loop and args.prompt is None
    if not alone and (args.image is None and args.video is None and not loop or args.prompt is None):
        p.error("the following arguments are required: --image, --video, --camera, --video-stream or --frames, "
                "and --prompt (or --verify alone)")
    if loop:
        from runtime.watch_cli import watch

        return run(lambda: watch(args, _write), args.debug)
    return run(lambda: _run(args), args.debug)


def _run(args) -> int:
    from runtime.pipeline import Pipeline

    if args.save_kept is not None:
        from runtime.visualize import check_save_path

        check_save_path(args.save_kept)
    if args.image is None and args.video is None:  # --verify alone
        from contract.manifest import Manifest, verify_files

        manifest = Manifest.read(args.export_dir)
        verify_files(args.export_dir, manifest)
        _write(f"{args.export_dir}: {len(manifest.files)} files match the manifest's sha256")
        return 0
    pipe = Pipeline.load(args.export_dir, backend=args.backend, threads=args.threads, verify=args.verify)
    modality, source = ("video", args.video) if args.video is not None else ("image", args.image)
    if modality not in pipe.manifest.modalities:
        raise InputError(f"--{modality}: the export in {str(args.export_dir)!r} ({pipe.manifest.family}) takes "
                         f"{' or '.join(sorted(pipe.manifest.modalities))} input only")
    stream = None if args.json else (lambda row, piece: _write(piece, end=""))
    result = pipe.generate(
        source, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_text=stream, modality=modality,
    )
    if args.save_kept is not None:
        from runtime.visualize import save_kept

        pixels, _ = pipe.layouts[modality].tiles(source)  # [S, 3, H, W] (tiles, frames): drawn side by side
        kept, filled = result.kept_indices.reshape(len(pixels), -1), None
        if result.kept_stages:  # in-LLM pruning: stage 1 outlined, the last stage filled
            from contract.layouts import token_sources
            from runtime.visualize import per_sub_image

            sources = token_sources(pipe.modality(modality).layout, pipe.manifest.method.grid)
            kept = per_sub_image(result.kept_stages[0], sources, len(pixels))
            if len(result.kept_stages) > 1:
                filled = per_sub_image(result.kept_stages[-1], sources, len(pixels))
        save_kept(args.save_kept, pixels, kept, pipe.modality(modality).preprocess, pipe.manifest.method.grid,
                  filled=filled)
    method = pipe.manifest.method
    pruning = pipe.manifest.llm_pruning
    if args.json:
        _write(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "kept_indices": result.kept_indices.tolist(),
            "kept_stages": [k.tolist() for k in result.kept_stages],
            "method": {"name": method.name, "keep": method.keep, "num_patches": method.num_patches,
                       "positions": method.positions, "prune_layers": list(pruning.layers) if pruning else None},
            "prompt_tokens": result.prompt_tokens,
            "timings": result.timings.as_dict(),
        }, indent=2))
        return 0
    t = result.timings
    _write("")
    if pruning is not None:
        window = len(result.kept_indices.reshape(-1))
        kept_text = (f"{method.name} kept " + " then ".join(str(len(k)) for k in result.kept_stages) +
                     f" of {window} visual tokens at LLM layers {', '.join(map(str, pruning.layers))}")
    else:
        kept_text = (f"{method.name} kept {method.keep}/{method.num_patches} visual tokens"
                     f"{' per sub-image' if result.kept_indices.ndim > 1 else ''}")
    print(
        f"-- {kept_text} | prompt {result.prompt_tokens} tokens | "
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
        drawn = "stage 1 outlined, last stage filled" if len(result.kept_stages) > 1 else "outlined"
        print(f"-- kept patches drawn in {args.save_kept} ({drawn})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m runtime EXPORT --camera N | --video-stream URL_OR_FILE | --frames DIR --prompt ...`: the perception
loop (runtime/watch.py) on the command line. One line per answer on stdout (or one JSON object per line in
--jsonl FILE); at exit, on stderr, p50/p90/p99 of every stage and of capture-to-answer latency, and the frame
counts (also after Ctrl-C or a source error)."""

from __future__ import annotations

import json
import sys
from collections import deque
from typing import Callable

import numpy as np

from contract.errors import InputError
from runtime.preprocess import describe_path
from runtime.watch import Answer

KEPT_FOR_PERCENTILES = 100_000  # latest answers whose numbers the exit summary uses: memory stays flat for days
STAGES = ("preprocess", "vision", "projector", "prefill", "decode", "total", "age")


def stage_seconds(answer: Answer) -> dict[str, float]:
    t = answer.timings
    return {"preprocess": t.preprocess, "vision": t.vision, "projector": t.projector, "prefill": t.prefill,
            "decode": float(sum(t.decode_steps)), "total": t.total, "age": answer.age_s}


def line(answer: Answer) -> str:
    """frame, age, dropped, the answer (quoted: one line whatever it holds), stage timings in ms."""
    stages = stage_seconds(answer)
    said = json.dumps(answer.text, ensure_ascii=False)
    if answer.choice_probs is not None:
        said += " (" + ", ".join(f"{c} {p:.2f}" for c, p in answer.choice_probs.items()) + ")"
    times = " ".join(f"{name} {stages[name] * 1e3:.1f}" for name in STAGES[:-2])
    return (f"frame {answer.frame_index} | age {answer.age_s * 1e3:.1f} ms | dropped {answer.dropped} | {said} | "
            f"{times} ms | {answer.finish_reason}")


def record(answer: Answer) -> dict:
    """One --jsonl line."""
    return {"frame_index": answer.frame_index, "captured_at": answer.captured_at, "age_s": answer.age_s,
            "dropped": answer.dropped, "text": answer.text, "choice": answer.choice,
            "choice_probs": answer.choice_probs, "finish_reason": answer.finish_reason,
            "token_ids": answer.token_ids, "decode_steps": len(answer.timings.decode_steps),
            **{f"{name}_s": value for name, value in stage_seconds(answer).items()}}


def summary(seconds: dict[str, deque], stats) -> list[str]:
    lines = [f"-- frames seen {stats.seen} | answered {stats.answered} | dropped {stats.dropped} | "
             f"unreadable {stats.corrupt} | reconnects {stats.reconnects}"]
    if seconds["total"]:
        lines.append(f"-- ms over {len(seconds['total'])} answers: p50 / p90 / p99")
        for name in STAGES:
            p50, p90, p99 = np.percentile(np.asarray(seconds[name]) * 1e3, [50, 90, 99])
            label = "capture-to-answer" if name == "age" else name
            lines.append(f"--   {label:<18} {p50:8.1f} {p90:8.1f} {p99:8.1f}")
    return lines


def _source_errors() -> tuple[type[BaseException], ...]:
    """What the capture libraries raise for a broken stream, of those the loop imported."""
    found = [getattr(sys.modules.get("av.error"), "FFmpegError", None), getattr(sys.modules.get("cv2"), "error", None)]
    return (OSError, RuntimeError, ValueError, *[error for error in found if isinstance(error, type)])


def watch(args, write: Callable[[str], None]) -> int:
    from runtime.pipeline import Pipeline

    for flag, given in (("--sample", args.sample), ("--json", args.json), ("--save-kept", args.save_kept)):
        if given:
            raise InputError(f"{flag} is not available in the perception loop (greedy answers; use --jsonl FILE)")
    out = None
    if args.jsonl is not None:
        try:
            out = open(args.jsonl, "a", encoding="utf-8")  # appended: a file that exists loses nothing
        except OSError as exc:
            raise InputError(f"--jsonl {describe_path(args.jsonl)} cannot be written: {exc.strerror or exc}") from None
    try:
        pipe = Pipeline.load(args.export_dir, backend=args.backend, threads=args.threads, verify=args.verify)
        if "image" not in pipe.manifest.modalities:
            raise InputError(f"the export in {str(args.export_dir)!r} ({pipe.manifest.family}) takes no images")
        source = next(s for s in (args.camera, args.video_stream, args.frames) if s is not None)
        loop = pipe.watch(source, args.prompt, choices=args.choices, max_new_tokens=args.max_new_tokens,
                          deadline_ms=args.deadline_ms, every=args.every, realtime=args.realtime,
                          overlap=args.overlap, reconnects=args.reconnects)
        seconds = {name: deque(maxlen=KEPT_FOR_PERCENTILES) for name in STAGES}
        try:
            for answer in loop:
                for name, value in stage_seconds(answer).items():
                    seconds[name].append(value)
                if out is not None:
                    out.write(json.dumps(record(answer), ensure_ascii=False) + "\n")
                    out.flush()
                else:
                    write(line(answer))
        except _source_errors() as exc:  # a decoder's or camera library's own error (PyAV, OpenCV) from the
            # source: the command line still owes the user one line (the API re-raises it as it is)
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InputError(f"the source failed after {loop.stats.seen} frames: {type(exc).__name__}: {reason}") from None
        finally:
            loop.close()
            print("\n".join(summary(seconds, loop.stats)), file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    return 0

"""Perception-loop benchmark: frames answered per second and capture-to-answer latency (p50 / p99) of
`Pipeline.watch` on a live synthetic camera (real photos at --fps), for several K, with yes/no choices and with
16-token answers, sequential and overlapped (the next frame encoded while this one decodes), side by side.

    python scripts/bench_loop.py                         # bench model, K = 576 144 32
    python scripts/bench_loop.py --model tiny            # quick

Exports go to --work (the same directories scripts/bench.py uses); writes bench-loop-MODEL.json there and a
PNG plot of latency against K when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_CHOICES = "Is there a cat in the picture? Answer yes or no."
PROMPT_TEXT = "What is in the picture? Describe it in detail."


def camera(fps: float, seconds: float):
    """A live source: real photos (cycled) at `fps` for `seconds`."""
    import skimage.data

    photos = [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()]
    start = time.perf_counter()
    for i in range(int(fps * seconds)):
        time.sleep(max(0.0, start + i / fps - time.perf_counter()))
        yield photos[i % len(photos)]


def measure(pipe, mode: str, args) -> dict:
    """Sequential and overlapped, alternating for --rounds rounds (a load that changes over time hits both)."""
    options = dict(choices=["yes", "no"]) if mode == "yes/no" else dict(max_new_tokens=args.new_tokens)
    prompt = PROMPT_CHOICES if mode == "yes/no" else PROMPT_TEXT
    answers: dict[bool, list] = {False: [], True: []}
    elapsed = {False: 0.0, True: 0.0}
    for _ in range(args.rounds):
        for overlap in (False, True):
            start = time.perf_counter()
            answers[overlap] += list(pipe.watch(camera(args.fps, args.seconds), prompt, overlap=overlap, **options))
            elapsed[overlap] += time.perf_counter() - start
    row = {}
    for overlap, mine in answers.items():
        ages = np.array([a.age_s for a in mine]) * 1e3
        row["overlapped" if overlap else "sequential"] = {
            "answered_per_s": len(mine) / elapsed[overlap], "p50_ms": float(np.percentile(ages, 50)),
            "p99_ms": float(np.percentile(ages, 99)), "answers": len(mine),
            "tokens_per_answer": float(np.mean([len(a.token_ids) for a in mine])),
            "stage_p50_ms": {stage: float(np.median([getattr(a.timings, stage) for a in mine]) * 1e3)
                             for stage in ("preprocess", "vision", "projector", "prefill", "total")}}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| K | answer | tokens | sequential answers/s | p50 ms | p99 ms | overlapped answers/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, o = r["sequential"], r["overlapped"]
        lines.append(f"| {r['keep']} | {r['mode']} | {s['tokens_per_answer']:.1f} | {s['answered_per_s']:.1f} | "
                     f"{s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {o['answered_per_s']:.1f} | {o['p50_ms']:.0f} | "
                     f"{o['p99_ms']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for how, style in (("sequential", "-"), ("overlapped", "--")):
            mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["keep"])
            keeps = [r["keep"] for r in mine]
            line, = ax.plot(keeps, [r[how]["p50_ms"] for r in mine], style, marker="o", label=f"{mode}, {how}, p50")
            ax.plot(keeps, [r[how]["p99_ms"] for r in mine], style, marker="x", color=line.get_color(), alpha=0.5,
                    label=f"{mode}, {how}, p99")
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens kept (K)")
    ax.set_ylabel("capture-to-answer latency (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench", help="built-in checkpoint: bench (default) or tiny")
    p.add_argument("--keeps", type=int, nargs="+", default=[576, 144, 32])
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the synthetic camera (default 30)")
    p.add_argument("--seconds", type=float, default=2.0, help="run time of each configuration per round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, sequential and overlapped alternating (default 3)")
    p.add_argument("--new-tokens", type=int, default=16, help="length of the text answers (default 16)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--work", type=Path, default=ROOT / "bench-results", help="exports and results go here")
    args = p.parse_args()

    from export.api import Progress, run
    from export.spec import ExportOptions
    from runtime.pipeline import Pipeline

    progress = Progress()
    rows = []
    for keep in args.keeps:
        out = args.work / f"llava15-{args.model}-k{keep}"
        if not (out / "manifest.json").exists():
            with progress.step(f"exporting llava15 {args.model} K={keep}"):
                run(ExportOptions("llava15", keep, model=args.model, out=out, force=True), progress)
        pipe = Pipeline.load(out, threads=args.threads)
        pipe.generate(next(camera(1000, 1)), PROMPT_TEXT, max_new_tokens=2)  # warm-up
        for mode in ("yes/no", f"{args.new_tokens} tokens"):
            with progress.step(f"K={keep} {mode}, sequential and overlapped"):
                rows.append({"keep": keep, "mode": mode, **measure(pipe, mode, args)})
    text = table(rows)
    print(f"\n{args.fps:g} fps synthetic camera, {args.rounds} x {args.seconds:g} s per configuration, "
          f"model {args.model}, {os.cpu_count()} cores\n")
    print(text)
    args.work.mkdir(parents=True, exist_ok=True)
    result = args.work / f"bench-loop-{args.model}.json"
    result.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"\nwrote {result}")
    print(plot(rows, args.work / f"bench-loop-{args.model}.png"))


if __name__ == "__main__":
    main()

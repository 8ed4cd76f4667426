"""Where in the image do FastV and FEATHER keep tokens? The positional bias FEATHER's paper is about, measured
on real LLM weights through the exported graphs.

    python scripts/bench_position_bias.py              # exports bench-smollm2 with fastv and feather (once)

The model is the built-in `bench-smollm2` LLaVA-1.5: the bench vision tower and projector (random weights)
before SmolLM2-135M-Instruct's real LLM (30 layers, 9 query / 3 KV heads). Both methods at their published
settings scaled to 30 layers (FastV: layer 3, R = 0.75, RoPE in the score; FEATHER: layers 8 and 15, R = 0.7,
no RoPE, stride-3 grid). Over real photos (and the same photos flipped upside down, a control: a bias that
follows content would flip with it) and several prompts, it prints the mean row of the kept tokens as a
fraction of the image height (0 = top row, 1 = bottom row; every token kept gives 0.5) and the share kept
in the bottom half. FEATHER's paper reports FastV (layer 3, 75 %) keeping tokens at a mean row of 80.7 % of
the height on LLaVA-1.5-7B.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is in the picture?",
    "Describe the image in detail.",
    "What color is the object in the center?",
    "Is there any text in the image? Read it.",
]


def photos() -> dict[str, np.ndarray]:
    import skimage.data

    gray = skimage.data.camera()
    base = {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(),
            "rocket": skimage.data.rocket(), "camera": np.stack([gray] * 3, axis=-1)}
    return {**base, **{f"{name} (flipped)": np.ascontiguousarray(image[::-1]) for name, image in base.items()}}


def rows_of(window: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Window indices of LLaVA-1.5's single layout (patch indices) -> normalised row centres in [0, 1]."""
    return (window // grid[1] + 0.5) / grid[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-smollm2", help="llava15 checkpoint (default: built-in bench-smollm2)")
    p.add_argument("--work", type=Path, default=ROOT / "bench-results", help="exports and results go here")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    from export.api import Progress, run
    from export.spec import ExportOptions
    from runtime import Pipeline
    from scripts.bench import current

    progress = Progress()
    images = photos()
    stats: dict[str, dict[str, list[float]]] = {}
    for method in ("fastv", "feather"):
        out = args.work / f"llava15-{args.model}-{method}"
        if not current(out):
            with progress.step(f"exporting llava15 {args.model} --method {method}"):
                run(ExportOptions("llava15", model=args.model, out=out, force=True, method=method), progress)
        with progress.step(f"{method}: {len(images)} photos x {len(PROMPTS)} prompts"), \
                Pipeline.load(out, threads=args.threads) as pipe:
            grid = pipe.manifest.method.grid
            layers = pipe.manifest.llm_pruning.layers
            for name, image in images.items():
                for prompt in PROMPTS:
                    result = pipe.generate(image, prompt, max_new_tokens=1)
                    for stage, kept in zip(layers, result.kept_stages):
                        rows = rows_of(kept, grid)
                        key = f"{method} (layer {stage})"
                        group = "flipped" if "flipped" in name else "upright"
                        entry = stats.setdefault(key, {"upright": [], "flipped": [], "bottom": [], "count": []})
                        entry[group].append(float(rows.mean()))
                        entry["bottom"].append(float((rows > 0.5).mean()))
                        entry["count"].append(len(kept))
    lines = [f"model {args.model!r}, {len(images) // 2} photos (+ flipped), {len(PROMPTS)} prompts", "",
             f"{'method (first pruned layer)':<28} {'kept':>6} {'mean row, upright':>18} {'flipped':>8} "
             f"{'in bottom half':>15}"]
    for key, entry in stats.items():
        lines.append(f"{key:<28} {np.mean(entry['count']):>6.0f} {np.mean(entry['upright']):>18.1%} "
                     f"{np.mean(entry['flipped']):>8.1%} {np.mean(entry['bottom']):>15.1%}")
    lines += ["", "FEATHER paper (LLaVA-1.5-7B, FastV at layer 3, 75 %): mean kept row at 80.7 % of the image height"]
    table = "\n".join(lines)
    print(table)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / f"position-bias-{args.model}.json").write_text(json.dumps({"stats": stats, "table": table}, indent=2))


if __name__ == "__main__":
    main()

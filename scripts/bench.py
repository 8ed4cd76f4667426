"""Side-by-side benchmark: prunevlm (exported graphs, ONNX Runtime) vs the Hugging Face PyTorch reference
(eager generate with the same FasterVLM pruning), for several K, on one machine in one run.

    python scripts/bench.py                      # bench model, K = 576 144 58 32
    python scripts/bench.py --model tiny --keeps 576 32 --new-tokens 8 --repeats 2   # quick check
    python scripts/bench.py --method feather     # FEATHER (and fastv) against unpruned, LLaVA-1.5 only

Each configuration runs in its own subprocess so its peak memory (max RSS) is its own. Reports per-stage
latency (median over repeats), time to first token, decode tokens/s, peak memory, the ratios, and checks:
  - LLM prefill speed-up from the largest to the smallest K against the prefill FLOP ratio (target >= 80 %)
  - cost of the [CLS] score + top-k inside the vision graph (target < 3 % of the vision graph's time)
  - runtime overhead per decode step, time outside the graph call (target < 5 %)
  - prunevlm faster than the reference at every K

With --method feather / fastv: the unpruned export and the in-LLM pruned one side by side, each against the
test-side PyTorch reference of the method (tests/feather_reference.py, the HF model's layers run by hand) at
the same settings; tokens kept per stage, prefill time and the LLM prefill FLOP ratio (target: speed-up
>= 80 % of it), decode tokens/s (target: faster than unpruned), KV-cache bytes per block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract import names  # noqa: E402  (needs the repository root on sys.path)

PROMPT = "What is in the picture? Describe it in detail."


def llm_variant(name: str, parser) -> dict:
    """A --llm-variants name -> the ExportOptions fields it sets."""
    target, _, weights = name.partition("-")
    if target not in ("standard", "onnxruntime") or weights not in ("", "int4", "int8") or name == "standard-int8":
        parser.error(f"--llm-variants {name!r}: use standard, onnxruntime, standard-int4, onnxruntime-int4 or "
                     "onnxruntime-int8")
    return {"target": target, "llm_weights": weights or "float"}


def impl_name(variant: str, args) -> str:
    """The table's name for a variant: the first is "prunevlm" (what the checks read), the others name theirs."""
    return "prunevlm" if variant == args.llm_variants[0] else f"prunevlm {variant}"


def current(out: Path) -> bool:
    """An export this version of the toolkit reads (an older one, or none, is exported again)."""
    from contract.errors import ManifestError
    from contract.manifest import Manifest

    try:
        Manifest.read(out)
        return True
    except ManifestError:
        return False


def photo():
    import skimage.data

    return skimage.data.chelsea()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter survives exec, so a worker
    would inherit the driver's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- workers (one configuration each, in a subprocess) ---------------------------------------------

def worker_prunevlm(args) -> dict:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.export_dir, threads=args.threads)
    image = photo()
    pipe.generate(image, PROMPT, max_new_tokens=2)  # warm-up
    results = [pipe.generate(image, PROMPT, max_new_tokens=args.new_tokens) for _ in range(args.repeats)]
    runs = [r.timings for r in results]
    med = lambda f: statistics.median(f(t) for t in runs)  # noqa: E731
    return {
        "vision_s": med(lambda t: t.vision),
        "projector_s": med(lambda t: t.projector),
        "prefill_s": med(lambda t: t.prefill),
        "ttft_s": med(lambda t: t.time_to_first_token),
        "decode_tokens_per_s": med(lambda t: t.decode_tokens_per_s),
        "decode_overhead_fraction": med(lambda t: t.decode_overhead_fraction),
        "prompt_tokens": results[0].prompt_tokens,
        "kept_stages": [len(k) for k in results[0].kept_stages],
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_hf_in_llm(args) -> dict:
    """The PyTorch reference of FEATHER / FastV (tests/feather_reference.py) on the HF model, unpruned input
    embeddings built by HF's processor and projector; prefill = one token, decode = the rest."""
    import torch

    from contract.manifest import Manifest
    from export import checkpoints
    from export.families import FAMILIES
    from tests import feather_reference as ref

    torch.set_num_threads(args.threads or torch.get_num_threads())
    family = FAMILIES[args.family]
    model, processor = family.load(checkpoints.for_family(family, args.model))
    pruning = Manifest.read(args.export_dir).llm_pruning
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True
    )
    image = photo()
    patches = family.method_spec(model.config, 1).num_patches
    ids = processor(images=[image], text=[text], return_tensors="pt")["input_ids"]
    positions = (ids == model.config.image_token_id).nonzero()[:, 1][None]  # [1, n]

    def once(new_tokens: int) -> dict:
        stages, embeds, mask = family.bench_reference(model, processor, text, image, patches)
        kwargs = dict(prune_layers=pruning.layers, reduction=pruning.reduction)
        start = time.perf_counter()
        if pruning.method == "feather":
            ref.feather(model, embeds, mask, positions, new_tokens, stride=pruning.stride, **kwargs)
        else:
            ref.fastv(model, embeds, mask, positions, new_tokens, **kwargs)
        return {**stages, "generate": time.perf_counter() - start}

    return reference_timings(once, args)


def worker_hf(args) -> dict:
    import torch

    from export import checkpoints
    from export.families import FAMILIES

    torch.set_num_threads(args.threads or torch.get_num_threads())
    family = FAMILIES[args.family]
    path = checkpoints.for_family(family, args.model)
    model, processor = family.load(path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True
    )
    image = photo()

    def once(new_tokens: int) -> dict:
        stages, embeds, mask = family.bench_reference(model, processor, text, image, args.keep)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        return {**stages, "generate": time.perf_counter() - start}

    return reference_timings(once, args)


def reference_timings(once, args) -> dict:
    """A reference run's stages: once(new_tokens) -> {pre, vision, projector, generate} seconds; prefill is a
    one-token generate, decode the rest of an args.new_tokens one (medians over args.repeats)."""
    once(2)  # warm-up
    firsts = [once(1) for _ in range(args.repeats)]
    fulls = [once(args.new_tokens) for _ in range(args.repeats)]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    prefill = med(firsts, "generate")
    decode_s = med(fulls, "generate") - prefill  # can come out <= 0 for a tiny model: then no figure
    return {
        "vision_s": med(firsts, "vision"),
        "projector_s": med(firsts, "projector"),
        "prefill_s": prefill,
        "ttft_s": med(firsts, "pre") + med(firsts, "vision") + med(firsts, "projector") + prefill,
        "decode_tokens_per_s": (args.new_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_topk(args) -> dict:
    """Vision graph with and without the [CLS] score + top-k, exported side by side and timed interleaved."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from export import checkpoints, onnx_io
    from export.families import FAMILIES, llava15
    from export.graph import GraphExport

    class FeaturesOnly(llava15.VisionGraph):
        def forward(self, pixel_values):
            hidden = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
            for layer in self.layers:
                hidden = layer(hidden, None)
            return hidden[:, 1:]

    family = FAMILIES[args.family]
    path = checkpoints.for_family(family, args.model)
    model, _ = family.load(path)
    full = family.graphs(model, family.method_spec(model.config, args.keep))[0]
    plain = GraphExport("vision_features", FeaturesOnly(full.module.tower, len(full.module.layers), args.keep),
                        full.spec.__class__(file="features.onnx", inputs=full.spec.inputs, outputs=full.spec.outputs[:1]),
                        full.example, {})
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for graph in (full, plain):
            spec = onnx_io.export_graph(graph, Path(tmp), opset=args.opset)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            sessions[graph.name] = ort.InferenceSession(str(Path(tmp) / spec.file), options)
        x = {names.PIXEL_VALUES: np.random.default_rng(0).standard_normal((1, 3, 336, 336), dtype=np.float32)}
        times = {name: [] for name in sessions}
        for _ in range(2):
            for s in sessions.values():
                s.run(None, x)
        for _ in range(max(args.repeats, 5) * 4):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, x)
                times[name].append(time.perf_counter() - t)
    with_sel, without = statistics.median(times["vision"]), statistics.median(times["vision_features"])
    return {"vision_s": with_sel, "features_only_s": without, "selection_fraction": (with_sel - without) / with_sel}


# --- driver ----------------------------------------------------------------------------------------

def run_worker(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--family", args.family, "--model", args.model,
           "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--opset", str(args.opset)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prefill_flops(llm: dict, tokens: int) -> float:
    """Multiply-adds x2 of one prefill: projections and MLP per token, attention scores and values over
    all keys (the graph computes the masked square), the LM head for the last token only."""
    d, h, kv, dh, layers = llm["hidden_size"], llm["num_heads"], llm["num_kv_heads"], llm["head_dim"], llm["num_layers"]
    inter = llm["intermediate_size"]
    per_token = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * inter)
    attention = 2 * 2 * tokens * tokens * h * dh
    return layers * (tokens * per_token + attention) + 2 * d * llm["vocab_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from export.families import FAMILIES

    benched = sorted(name for name, family in FAMILIES.items() if hasattr(family, "bench_reference"))
    p.add_argument("--family", default="llava15", choices=benched,
                   help="model family with a PyTorch reference to compare with (default llava15)")
    p.add_argument("--model", default="bench", help="checkpoint for both sides (default: built-in 'bench')")
    p.add_argument("--keeps", type=int, nargs="+", default=None,
                   help="visual tokens kept per image/sub-image (default: the family's unpruned count and the "
                   "paper's budgets, BENCH_KEEPS in its module)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for both sides (0: all cores)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--work", type=Path, default=ROOT / "bench-results", help="exports and results go here")
    p.add_argument("--skip-hf", action="store_true", help="only prunevlm (no reference columns)")
    p.add_argument("--method", default="fastervlm", choices=("fastervlm", "feather", "fastv"),
                   help="fastervlm (default: the --keeps sweep) or an in-LLM method at its default settings against "
                   "the unpruned export (llava15 only)")
    p.add_argument("--llm-variants", nargs="+", default=["standard"], metavar="VARIANT",
                   help="LLM graph variants of prunevlm to run side by side at every K: standard (the default export), "
                   "onnxruntime (--target onnxruntime), and either with -int4 / -int8 (--llm-weights; int8 needs the "
                   "onnxruntime target), e.g. standard onnxruntime onnxruntime-int8. The first is the one the checks use")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--export-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--keep", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = {"prunevlm": worker_prunevlm, "hf": worker_hf, "topk": worker_topk,
              "hf_in_llm": worker_hf_in_llm}[args.worker]
        print(json.dumps(fn(args)))
        return

    from export.api import Progress, run
    from export.spec import ExportOptions

    family = FAMILIES[args.family]
    variants = {name: llm_variant(name, p) for name in args.llm_variants}
    if args.method != "fastervlm" and args.llm_variants != ["standard"]:
        p.error(f"--llm-variants goes with the FasterVLM sweep, not --method {args.method}")
    if args.method != "fastervlm":
        return bench_in_llm(args, family)
    args.keeps = args.keeps or list(family.BENCH_KEEPS)
    # Both sides use the same layout: the family's BENCH_LAYOUT (for LLaVA-NeXT FasterVLM's, no unpadding and
    # no newline tokens, so K=576 is the unpruned baseline of 2880 visual tokens).
    layout = getattr(family, "BENCH_LAYOUT", None)
    progress = Progress()
    rows = {}
    for keep in args.keeps:
        rows[keep] = {}
        for variant, options in variants.items():
            suffix = "" if variant == "standard" else f"-{variant}"
            out = args.work / f"{args.family}-{args.model}-k{keep}{suffix}"
            if not current(out):
                with progress.step(f"exporting {args.family} {args.model} K={keep} {variant}"):
                    run(ExportOptions(args.family, keep, model=args.model, out=out, force=True, opset=args.opset,
                                      layout=layout, **options), progress)
            with progress.step(f"prunevlm K={keep} {variant}"):
                rows[keep][impl_name(variant, args)] = run_worker("prunevlm", args, export_dir=out)
        ref = None
        if not args.skip_hf:
            with progress.step(f"HF reference K={keep}"):
                ref = run_worker("hf", args, keep=keep)
        rows[keep]["hf"] = ref
    with progress.step("selection cost inside the vision graph"):
        topk = run_worker("topk", args, keep=min(args.keeps))

    first = "" if args.llm_variants[0] == "standard" else f"-{args.llm_variants[0]}"
    manifest = json.loads((args.work / f"{args.family}-{args.model}-k{args.keeps[0]}{first}" / "manifest.json").read_text())
    from transformers import AutoConfig

    from export import checkpoints
    from export.families import FAMILIES

    family = FAMILIES[args.family]
    text = AutoConfig.from_pretrained(
        checkpoints.for_family(family, args.model)).get_text_config()
    llm = dict(manifest[names.LLM], intermediate_size=text.intermediate_size)
    report = summarize(rows, topk, llm, args)
    print(report["table"])
    args.work.mkdir(parents=True, exist_ok=True)
    result = args.work / f"bench-{args.family}-{args.model}.json"
    result.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {result}")


def bench_in_llm(args, family) -> None:
    """--method feather / fastv: unpruned vs the method, each beside its PyTorch reference."""
    from contract.manifest import Manifest
    from export.api import Progress, run
    from export.spec import ExportOptions

    if args.family != "llava15":
        raise SystemExit("--method feather / fastv benchmarks llava15 (the reference builds LLaVA-1.5 inputs)")
    progress = Progress()
    configs = {"unpruned": dict(keep=576), args.method: dict(method=args.method)}
    rows, manifests = {}, {}
    for name, options in configs.items():
        out = args.work / f"{args.family}-{args.model}-{name}"
        if not current(out):
            with progress.step(f"exporting {args.family} {args.model} {name}"):
                run(ExportOptions(args.family, model=args.model, out=out, force=True, opset=args.opset, **options),
                    progress)
        manifests[name] = Manifest.read(out)
        with progress.step(f"prunevlm {name}"):
            ours = run_worker("prunevlm", args, export_dir=out)
        ref = None
        if not args.skip_hf:
            with progress.step(f"PyTorch reference {name}"):
                ref = run_worker("hf", args, keep=576) if name == "unpruned" else run_worker("hf_in_llm", args, export_dir=out)
        rows[name] = {"prunevlm": ours, "hf": ref}
    from transformers import AutoConfig

    from export import checkpoints

    text = AutoConfig.from_pretrained(checkpoints.for_family(family, args.model)).get_text_config()
    manifest = manifests[args.method]
    llm = {**{k: getattr(manifest.llm, k) for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                                      "num_layers", "vocab_size")},
           "intermediate_size": text.intermediate_size}
    prompt = rows["unpruned"]["prunevlm"]["prompt_tokens"]
    image = 576
    kept = rows[args.method]["prunevlm"]["kept_stages"]
    bounds = manifest.llm_pruning.bounds(llm["num_layers"])
    blocks = [(b - a, prompt - image + (kept[i - 1] if i else image)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    flops = prefill_flops_blocks(llm, blocks)
    flop_ratio = prefill_flops(llm, prompt) / flops
    lines = [f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}; {args.family} model "
             f"{args.model!r}; {args.new_tokens} new tokens; median of {args.repeats}", "",
             f"{'config':<9} {'impl':<9} {'kept per stage':>16} {'prefill ms':>11} {'TTFT ms':>9} {'decode tok/s':>13} "
             f"{'peak MB':>8}"]
    for name in configs:
        for impl in ("prunevlm", "hf"):
            r = rows[name][impl]
            if r is None:
                continue
            stages = "/".join(map(str, rows[name]["prunevlm"]["kept_stages"])) or "-"
            lines.append(f"{name:<9} {impl:<9} {stages:>16} {r['prefill_s'] * 1e3:>11.1f} {r['ttft_s'] * 1e3:>9.1f} "
                         f"{r['decode_tokens_per_s']:>13.1f} {r['peak_rss_mb']:>8.0f}")
    kv = lambda layers, tokens: 2 * layers * llm["num_kv_heads"] * llm["head_dim"] * tokens * 4  # noqa: E731 (fp32)
    lines += ["", "KV cache after prefill, per block (layers: tokens, MB): " + "; ".join(
        f"{bounds[i]}..{bounds[i + 1] - 1}: {t}, {kv(n, t) / 2**20:.1f}" for i, (n, t) in enumerate(blocks)) +
        f" = {sum(kv(n, t) for n, t in blocks) / 2**20:.1f} MB; unpruned {kv(llm['num_layers'], prompt) / 2**20:.1f} MB"]
    speedup = rows["unpruned"]["prunevlm"]["prefill_s"] / rows[args.method]["prunevlm"]["prefill_s"]
    decode = rows[args.method]["prunevlm"]["decode_tokens_per_s"] / rows["unpruned"]["prunevlm"]["decode_tokens_per_s"]
    checks = {"prefill_speedup_vs_flops": speedup / flop_ratio, "decode_vs_unpruned": decode}
    lines.append(f"LLM prefill FLOPs cut {1 - 1 / flop_ratio:.0%} (ratio {flop_ratio:.2f}x); prefill speed-up {speedup:.2f}x = "
                 f"{speedup / flop_ratio:.0%} of the FLOP ratio (target >= 80%)")
    lines.append(f"decode {decode:.2f}x the unpruned export's tokens/s (target > 1)")
    if rows[args.method]["hf"] is not None:
        for name in configs:
            ours, ref = rows[name]["prunevlm"], rows[name]["hf"]
            lines.append(f"{name}: prunevlm vs PyTorch reference: prefill {ref['prefill_s'] / ours['prefill_s']:.2f}x "
                         f"faster, decode {ours['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x faster")
    report = {"rows": rows, "flop_ratio": flop_ratio, "blocks": blocks, "checks": checks, "table": "\n".join(lines)}
    print(report["table"])
    args.work.mkdir(parents=True, exist_ok=True)
    result = args.work / f"bench-{args.family}-{args.model}-{args.method}.json"
    result.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {result}")


def prefill_flops_blocks(llm: dict, blocks: list[tuple[int, int]]) -> float:
    """prefill_flops for a decoder run as blocks of (layers, tokens each layer sees)."""
    per_layer = {**llm, "num_layers": 1, "vocab_size": 0}
    return sum(layers * prefill_flops(per_layer, tokens) for layers, tokens in blocks) + 2 * llm["hidden_size"] * llm["vocab_size"]


def summarize(rows: dict, topk: dict, llm: dict, args) -> dict:
    keeps = sorted(rows, reverse=True)
    lines = [f"machine: {cpu_name()}, {os.cpu_count()} cores, "
             f"python {platform.python_version()}; {args.family} model {args.model!r}; {args.new_tokens} new tokens; "
             f"median of {args.repeats}", ""]
    impls = list(dict.fromkeys(impl for k in keeps for impl in rows[k]))
    width = max(9, *map(len, impls))
    head = (f"{'K':>4} {'impl':<{width}} {'prompt':>6} {'vision ms':>10} {'proj ms':>8} {'prefill ms':>11} {'TTFT ms':>9} "
            f"{'decode tok/s':>13} {'peak MB':>8}")
    lines.append(head)
    checks = {}
    for k in keeps:
        for impl in impls:
            r = rows[k].get(impl)
            if r is None:
                continue
            prompt = rows[k]["prunevlm"]["prompt_tokens"]
            lines.append(f"{k:>4} {impl:<{width}} {prompt:>6} {r['vision_s'] * 1e3:>10.1f} {r['projector_s'] * 1e3:>8.2f} "
                         f"{r['prefill_s'] * 1e3:>11.1f} {r['ttft_s'] * 1e3:>9.1f} {r['decode_tokens_per_s']:>13.1f} "
                         f"{r['peak_rss_mb']:>8.0f}")
    lines.append("")
    big, small = keeps[0], keeps[-1]
    tok = lambda k: rows[k]["prunevlm"]["prompt_tokens"]  # noqa: E731
    flop_ratio = prefill_flops(llm, tok(big)) / prefill_flops(llm, tok(small))
    speedup = rows[big]["prunevlm"]["prefill_s"] / rows[small]["prunevlm"]["prefill_s"]
    checks["prefill_speedup_vs_flops"] = speedup / flop_ratio
    lines.append(f"prefill speed-up K={big}->{small}: {speedup:.2f}x; FLOP ratio {flop_ratio:.2f}x; "
                 f"{speedup / flop_ratio:.0%} of it (target >= 80%)")
    checks["selection_fraction"] = topk["selection_fraction"]
    lines.append(f"[CLS] score + top-k in the vision graph: {topk['selection_fraction']:.1%} of its time "
                 f"({topk['vision_s'] * 1e3:.1f} vs {topk['features_only_s'] * 1e3:.1f} ms without; target < 3%)")
    share = rows[small]["prunevlm"]["vision_s"] / rows[small]["prunevlm"]["ttft_s"]
    checks["vision_share_of_ttft"] = share
    lines.append(f"vision graph at K={small}: {share:.0%} of the time to first token")
    for impl in impls:
        if impl.startswith("prunevlm "):
            for k in keeps:
                ours, other = rows[k]["prunevlm"], rows[k][impl]
                ttft, dec = ours["ttft_s"] / other["ttft_s"], other["decode_tokens_per_s"] / ours["decode_tokens_per_s"]
                checks[f"{impl.split()[1]}_ttft_speedup_k{k}"], checks[f"{impl.split()[1]}_decode_speedup_k{k}"] = ttft, dec
                lines.append(f"K={k}: {impl.split()[1]} vs {args.llm_variants[0]}: time to first token {ttft:.2f}x "
                             f"faster, decode {dec:.2f}x faster")
    overhead = max(rows[k]["prunevlm"]["decode_overhead_fraction"] for k in keeps)
    checks["decode_overhead_fraction"] = overhead
    lines.append(f"runtime overhead per decode step (outside the graph call): at most {overhead:.1%} (target < 5%)")
    if rows[keeps[0]]["hf"] is not None:
        for k in keeps:
            ours, ref = rows[k]["prunevlm"], rows[k]["hf"]
            ttft, dec = ref["ttft_s"] / ours["ttft_s"], ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            checks[f"ttft_speedup_vs_hf_k{k}"], checks[f"decode_speedup_vs_hf_k{k}"] = ttft, dec
            lines.append(f"K={k}: prunevlm vs HF reference: time to first token {ttft:.2f}x faster, decode {dec:.2f}x faster")
    from export.families import FAMILIES

    paper = getattr(FAMILIES[args.family], "BENCH_PAPER_TTFT", None)
    if paper and rows[keeps[0]]["hf"] is not None:
        ours = rows[big]["prunevlm"]["ttft_s"] / rows[small]["prunevlm"]["ttft_s"]
        ref = rows[big]["hf"]["ttft_s"] / rows[small]["hf"]["ttft_s"]
        lines.append(f"time to first token K={big}->{small} ({tok(big)} -> {tok(small)} prompt tokens): prunevlm "
                     f"{ours:.2f}x, HF reference {ref:.2f}x faster; {paper}")
    return {"rows": rows, "topk": topk, "flop_ratio": flop_ratio, "checks": checks, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()

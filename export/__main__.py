"""python -m export FAMILY --keep K [--model M] [--out DIR] ..."""

from __future__ import annotations

import sys
from pathlib import Path

from contract.cli import ArgumentParser, run


def parser() -> ArgumentParser:
    from export.families import FAMILIES

    p = ArgumentParser(
        prog="python -m export",
        description="Export a vision-language model with visual-token pruning as ONNX graphs plus a manifest: "
        "FasterVLM (vision encoder + top-k, gather + projector, LLM with KV cache) or FEATHER / FastV (the LLM split "
        "into blocks at the prune layers, each with its own KV cache, and a selection graph per prune point).",
        epilog="examples: python -m export llava15 --keep 32 --model tiny; "
        "python -m export llava15 --method feather --model tiny",
    )
    p.add_argument("family", help=f"model family: {', '.join(sorted(FAMILIES))}")
    p.add_argument("--method", default="fastervlm", choices=("fastervlm", "feather", "fastv"),
                   help="fastervlm (default): keep the top K patches by the vision encoder's [CLS] attention (--keep); "
                   "feather: prune inside the LLM at two layers by the last prompt token's attention (no RoPE) plus a "
                   "uniform grid, original positions; fastv: prune once inside the LLM (with RoPE). See README 'FEATHER'")
    p.add_argument("--keep", type=int, default=None, metavar="K",
                   help="FasterVLM: visual tokens kept per image, tile or frame; all patches = no pruning (" +
                   "; ".join(f"{name}: {family.KEEP_HELP}" for name, family in sorted(FAMILIES.items())) + ")")
    p.add_argument("--model", default=None,
                   help="checkpoint: a local HF directory, an HF id already in the local cache, 'tiny' "
                   "(built-in random-weight model, offline), 'bench' (larger random model) or 'bench-smollm2' (the bench vision "
                   "tower before SmolLM2-135M-Instruct's real LLM weights); default: the family's "
                   "reference checkpoint (" + "; ".join(f"{n}: {f.DEFAULT_MODEL}" for n, f in sorted(FAMILIES.items())) + ")")
    p.add_argument("--prune-layers", type=_layers, default=None, metavar="K1,K2",
                   help="feather / fastv: first LLM layer of each pruned block, 0-based (default: feather 8,16, fastv 3, "
                   "for a 32-layer LLM; scaled to round(K*L/32) for an LLM of L layers)")
    p.add_argument("--reduction", type=float, default=None, metavar="R",
                   help="feather / fastv: R in (0, 1); stage s keeps int(n*(1-R)^s) tokens by score (default: feather 0.7, "
                   "fastv 0.75)")
    p.add_argument("--grid-stride", type=int, default=None, metavar="S",
                   help="feather: stage 1 also keeps grid[::S, ::S] of every sub-image (default 3: 64 of 24x24)")
    p.add_argument("--positions", default=None, choices=("packed", "original"),
                   help="fastervlm: kept tokens' RoPE positions renumbered (packed, default, as in FasterVLM's paper) or "
                   "the ones they have in the unpruned sequence (original); feather / fastv always use original")
    p.add_argument("--out", type=Path, default=None,
                   help="export directory (default: exports/FAMILY-kK, exports/FAMILY-feather, exports/FAMILY-fastv)")
    p.add_argument("--force", action="store_true", help="replace the export directory if it exists")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip checking each graph against PyTorch (ONNX Runtime on random inputs)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17-23; 17-20 for TensorRT; default 18)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + answer the export is meant for (default: the LLM's max positions)")
    layouts = "; ".join(f"{name}: " + ", ".join(f"'{layout}' ({text})" for layout, text in family.LAYOUT_HELP.items())
                        for name, family in sorted(FAMILIES.items()) if len(family.LAYOUTS) > 1)
    p.add_argument("--layout", default=None, help=f"visual-token layout where a family has several ({layouts})")
    p.add_argument("--dtype", default="float32", help="float32 (default) or float16: fp16 graphs with fp32 "
                   "islands (LayerNorm, Softmax, the [CLS]-score path, RMSNorm, rotary angles) and fp32 inputs/outputs, "
                   "validated against PyTorch with looser tolerances; what TensorRT 11 builds FP16 engines from")
    p.add_argument("--target", default="standard",
                   help="standard (default): ONNX operators only, for ONNX Runtime and TensorRT; onnxruntime: the LLM's "
                   "attention is ONNX Runtime's GroupQueryAttention over a preallocated KV buffer written in place "
                   "(faster CPU decode; ONNX Runtime only, TensorRT refuses it)")
    p.add_argument("--llm-weights", default="float",
                   help="float (default); int4: the LLM graphs' linear weights quantized by HQQ to 4 bits (blocks of "
                   "32, float zero points kept exactly by a small float branch; int4 DequantizeLinear -> MatMul, "
                   "opset 21, which ONNX Runtime runs as MatMulNBits), the lm_head to int8; or int8 (with --target "
                   "onnxruntime: ONNX Runtime's MatMulNBits with 8-bit weights, block 32; closer to float, and as fast "
                   "on a small LLM). The vision and projector graphs stay float. README: Benchmark")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _layers(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices, e.g. 8,16") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from export.spec import ExportOptions

        options = ExportOptions(
            family=args.family, keep=args.keep, model=args.model, out=args.out, force=args.force,
            validate=args.validate, opset=args.opset, max_seq_len=args.max_seq_len, layout=args.layout,
            dtype=args.dtype, method=args.method, prune_layers=args.prune_layers, reduction=args.reduction,
            grid_stride=args.grid_stride, positions=args.positions, target=args.target,
            llm_weights=args.llm_weights,
        )
        from export.api import run as export  # heavy (transformers, onnx): only once the options are valid

        print(export(options))
        return 0

    return run(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""python -m export FAMILY --keep K [--model M] [--out DIR] ..."""

from __future__ import annotations

import sys
from pathlib import Path

from contract.cli import ArgumentParser, run


def parser() -> ArgumentParser:
    from export.families import FAMILIES

    p = ArgumentParser(
        prog="python -m export",
        description="Export a vision-language model with FasterVLM visual-token pruning as ONNX graphs "
        "(vision encoder + top-k, gather + projector, LLM with KV cache) plus a manifest.",
        epilog="example: python -m export llava15 --keep 32 --model tiny",
    )
    p.add_argument("family", help=f"model family: {', '.join(sorted(FAMILIES))}")
    p.add_argument("--keep", type=int, required=True, metavar="K",
                   help="visual tokens kept per image, tile or frame; all patches = no pruning (" +
                   "; ".join(f"{name}: {family.KEEP_HELP}" for name, family in sorted(FAMILIES.items())) + ")")
    p.add_argument("--model", default=None,
                   help="checkpoint: a local HF directory, an HF id already in the local cache, 'tiny' "
                   "(built-in random-weight model, offline) or 'bench' (larger random model); default: the family's "
                   "reference checkpoint (" + "; ".join(f"{n}: {f.DEFAULT_MODEL}" for n, f in sorted(FAMILIES.items())) + ")")
    p.add_argument("--out", type=Path, default=None, help="export directory (default: exports/FAMILY-kK)")
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
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from export.spec import ExportOptions

        options = ExportOptions(
            family=args.family, keep=args.keep, model=args.model, out=args.out, force=args.force,
            validate=args.validate, opset=args.opset, max_seq_len=args.max_seq_len, layout=args.layout,
            dtype=args.dtype,
        )
        from export.api import run as export  # heavy (transformers, onnx): only once the options are valid

        print(export(options))
        return 0

    return run(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

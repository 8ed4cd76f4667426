"""Profile an export's graphs with trtexec, per layer; print the commands when trtexec is not installed.

    python scripts/trtexec_profile.py commands EXPORT_DIR [--graph llm] [--phase decode] [--batch 1]
        [--seq-len N] [--max-seq-len N] [--precision onnx|fp16|int8|best] [--version 10|11] [--dry-run]
    python scripts/trtexec_profile.py commands EXPORT_DIR --engine ENGINE --graph llm --phase decode
    python scripts/trtexec_profile.py table PROFILE.json [--top 15]

The logic (profiles from the manifest, name quoting, version-specific flags, the profile JSON) lives in
engines.trtexec so it is importable and tested; this file is only the command line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.cli import ArgumentParser, run  # noqa: E402
from contract.errors import InputError  # noqa: E402
from contract.manifest import Manifest  # noqa: E402
from engines import trtexec  # noqa: E402  (needs the repository root on sys.path)


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python scripts/trtexec_profile.py",
        description="trtexec build-and-profile commands for a prunevlm export (run when trtexec is on PATH), "
                    "and trtexec's per-layer profile JSON as a table of the slowest layers.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    c = sub.add_parser("commands", parents=[common], help="print (and run, when trtexec is on PATH) the commands",
                       description="One trtexec command per graph (two per LLM graph, `llm` or each FEATHER / "
                                   "FastV block llm.0, llm.1, ...: prefill and decode profiles), "
                                   "with --minShapes/--optShapes/--maxShapes from the manifest's named axes, "
                                   "--shapes for the profiled run, and a per-layer profile export.")
    c.add_argument("export_dir", type=Path, metavar="EXPORT_DIR")
    c.add_argument("--graph", action="append", metavar="NAME",
                   help="only this graph: vision, llm, llm.0, select.image.1, ... (repeatable; default: all)")
    c.add_argument("--phase", choices=(*trtexec.PHASES, "both"), default="both",
                   help="KV-cache graphs: profile prefill (whole prompt, empty cache), decode (one token on a "
                        "cache of --seq-len tokens) or both (default)")
    c.add_argument("--batch", type=int, default=1, help="batch the profile is optimized and run for (default 1)")
    c.add_argument("--max-batch", type=int, default=None, help="largest batch the engine accepts (default: --batch)")
    c.add_argument("--seq-len", type=int, default=None,
                   help="prompt length in tokens (default: the export's K visual tokens + 64 text tokens)")
    c.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + answer length the engine accepts (default: the manifest's max_seq_len)")
    c.add_argument("--precision", choices=trtexec.PRECISIONS, default="onnx",
                   help="onnx (default): the ONNX's own types, a strongly typed network; fp16/int8/best: "
                        "TensorRT 10 builder flags (TensorRT 11 removed them)")
    c.add_argument("--version", "--trt", dest="major", type=int, choices=trtexec.MAJORS, default=None,
                   help="TensorRT major version to write flags for when neither trtexec nor tensorrt is "
                        "installed (otherwise detected from `trtexec --version` or tensorrt.__version__)")
    c.add_argument("--engine", type=Path, default=None,
                   help="profile this built engine (--loadEngine) instead of building from ONNX; needs one --graph")
    c.add_argument("--out", type=Path, default=None,
                   help="where engines and profile JSONs go (default: EXPORT_DIR/trtexec)")
    c.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    c.add_argument("--top", type=int, default=10, help="layers in each table after a run (default 10)")

    t = sub.add_parser("table", parents=[common], help="top-N layers of a trtexec --exportProfile JSON",
                       description="The slowest layers of a trtexec --exportProfile file, by average time per run.")
    t.add_argument("profile", type=Path, metavar="PROFILE_JSON")
    t.add_argument("--top", type=int, default=10, help="how many layers (default 10)")
    return p


def commands(args: argparse.Namespace) -> int:
    manifest = Manifest.read(args.export_dir)
    graphs = manifest.graphs
    for name in args.graph or ():
        if name not in graphs:
            raise InputError(f"--graph {name!r} is not in the export; it has {sorted(graphs)}")
    if args.graph:
        graphs = {name: graphs[name] for name in dict.fromkeys(args.graph)}
    if args.top < 1:
        raise InputError(f"--top {args.top} must be at least 1")
    sizes = trtexec.Sizes(
        batch=args.batch, max_batch=args.max_batch if args.max_batch is not None else args.batch,
        seq_len=args.seq_len if args.seq_len is not None else manifest.method.keep + 64,
        max_seq_len=args.max_seq_len if args.max_seq_len is not None else manifest.llm.max_seq_len,
    )
    phases = trtexec.PHASES if args.phase == "both" else (args.phase,)
    binary = shutil.which("trtexec")
    out_dir = args.out or args.export_dir / "trtexec"
    if args.engine is not None:
        if len(graphs) != 1 or not args.graph:
            raise InputError("--engine needs exactly one --graph: the graph the engine was built from")
        if not args.engine.is_file():
            raise InputError(f"--engine {str(args.engine)!r} does not exist")
        (name, spec), = graphs.items()
        todo = [trtexec.engine_command(args.engine, name, spec, sizes, out_dir, phase) for phase in phases]
        todo = list({c.name: c for c in todo}.values())  # a graph without a KV cache has one command
    else:
        major = trtexec.resolve_major(args.major, trtexec.detect_version(binary))
        todo = trtexec.onnx_commands(args.export_dir, graphs, sizes, major, out_dir, args.precision, phases)
    if binary is None or args.dry_run:
        for command in todo:
            print(command.shell())
        if binary is None:
            print("trtexec is not on PATH: commands printed, nothing run", file=sys.stderr)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for command in todo:
        print(f"$ {command.shell()}", flush=True)
        if subprocess.run([binary, *command.argv[1:]]).returncode != 0:
            failed.append(command.name)
            continue
        print(f"\n{command.name}: slowest layers")
        print(trtexec.format_top_layers(trtexec.read_profile(command.profile_json), args.top))
    if failed:
        print(f"error: trtexec failed for {', '.join(failed)} (its output is above)", file=sys.stderr)
        return 1
    return 0


def table(args: argparse.Namespace) -> int:
    print(trtexec.format_top_layers(trtexec.read_profile(args.profile), args.top))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(lambda: {"commands": commands, "table": table}[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

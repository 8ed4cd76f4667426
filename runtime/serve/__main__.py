"""python -m runtime.serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--api-key-env VAR] [--max-batch 8]
[--max-wait-ms 10] [--allow-image-dir DIR] [--ray --replicas N]: an OpenAI-compatible server for one export."""

from __future__ import annotations

import sys
from pathlib import Path

from contract.cli import ArgumentParser, run
from contract.errors import UserError
from runtime.serve.options import MAX_BATCH, ServeOptions


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m runtime.serve",
        description="Serve an export directory over HTTP with the OpenAI chat-completions API (POST /v1/chat/completions, "
        "GET /v1/models, /health, /metrics). Concurrent requests are batched. Needs pip install 'prunevlm[serve]'.",
        epilog="example: python -m runtime.serve exports/llava15-k32 --api-key-env PRUNEVLM_API_KEY",
    )
    p.add_argument("export_dir", type=Path, help="directory written by python -m export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--api-key-env", default=None, metavar="VAR", help="environment variable holding the API key; "
                   "every request must then send 'Authorization: Bearer <key>' (401 otherwise)")
    p.add_argument("--max-batch", type=int, default=8, help=f"requests run together in one pipeline call, 1..{MAX_BATCH} "
                   "(default 8; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first request of a batch waits for "
                   "others (default 10)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for the pipeline before new ones get 503 "
                   "(default 256)")
    p.add_argument("--allow-image-dir", type=Path, default=None, metavar="DIR", help="also accept images as local files "
                   "(file:// URLs or paths) inside DIR, symlinks resolved; default: base64 data URLs only")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16; 413 beyond)")
    p.add_argument("--max-image-mb", type=float, default=12.0, help="largest encoded image in MiB (default 12; 413 beyond)")
    p.add_argument("--max-tokens-default", type=int, default=64, help="answer length when a request gives no max_tokens "
                   "(default 64)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: the export directory's name)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default 0: all cores)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install 'prunevlm[ray]'): a local Ray "
                   "cluster, Ray's HTTP proxy on --host/--port")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas with --ray, each loading the export once")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def options_from(args) -> ServeOptions:
    return ServeOptions(
        export_dir=args.export_dir, host=args.host, port=args.port, api_key_env=args.api_key_env,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        allow_image_dir=args.allow_image_dir, max_body_bytes=_mib(args.max_body_mb, "--max-body-mb"),
        max_image_bytes=_mib(args.max_image_mb, "--max-image-mb"), default_max_tokens=args.max_tokens_default,
        model_name=args.model_name, threads=args.threads, ray=args.ray, replicas=args.replicas,
    )


def _mib(value: float, flag: str) -> int:
    if not 0 < value <= 2048:
        raise UserError(f"{flag} {value:g} must be in (0, 2048] MiB")
    return int(value * (1 << 20))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(lambda: _serve(options_from(args)), args.debug)


def _serve(options: ServeOptions) -> int:
    if options.ray:
        from runtime.serve import ray_app

        ray_app.start(options, blocking=True)
        return 0
    try:
        import uvicorn

        from runtime.serve.app import build_app
    except ImportError as exc:
        raise UserError(f"python -m runtime.serve needs the serve extra ({exc.name} is missing): "
                        "pip install 'prunevlm[serve]'") from None
    app = build_app(options)  # the export is loaded (and refused, with one line) before the port is bound
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

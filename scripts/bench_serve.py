"""Serving benchmark: throughput (requests/s) and p50/p99 latency of `python -m runtime.serve` against the
number of concurrent clients, for several K, batching on (--max-batch 8) and off (--max-batch 1), side by side
in one run; optionally the same for 1 and 2 Ray Serve replicas.

    python scripts/bench_serve.py                                  # tiny model, K = 576 32, 1 4 16 clients
    python scripts/bench_serve.py --keeps 32 --clients 1 8 --requests 16 --ray   # + Ray: 1 vs 2 replicas

Each server is a subprocess on 127.0.0.1 and a free port, stopped after its measurements; every client uses
the official openai package with one fixed photo and prompt (greedy, --max-tokens tokens). Requests per point:
max(--requests, 2 x clients). A PNG plot is written when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.compare import format_table  # noqa: E402  (needs the repository root on sys.path)

PROMPT = "What is in the picture? Describe it in detail."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keeps", type=int, nargs="+", default=[576, 32], help="K of the tiny model's exports")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--max-batch values (1: batching off)")
    p.add_argument("--requests", type=int, default=32, help="requests per point (at least 2 per client)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length (greedy; the tiny model rarely stops early)")
    p.add_argument("--ray", action="store_true", help="also 1 and 2 Ray Serve replicas (max-batch 8, first K)")
    p.add_argument("--exports", type=Path, default=ROOT / "exports", help="where the tiny exports are (made if missing)")
    p.add_argument("--plot", type=Path, default=ROOT / "bench-results" / "serve.png", help="PNG plot (needs matplotlib)")
    args = p.parse_args()

    url = _photo_url()
    rows, points = [], []
    configs = [(k, f"max-batch {b}", ["--max-batch", str(b)]) for k in args.keeps for b in args.batches]
    if args.ray:
        configs += [(args.keeps[0], f"ray x{n}", ["--ray", "--replicas", str(n), "--threads", "1"]) for n in (1, 2)]
    for keep, label, flags in configs:
        directory = _export(args.exports, keep)
        with _server(directory, flags) as port:
            for clients in args.clients:
                latencies, wall = _load(port, url, clients, max(args.requests, 2 * clients), args.max_tokens)
                q = statistics.quantiles(latencies, n=100, method="inclusive")
                point = (keep, label, clients, len(latencies) / wall, q[49], q[98])
                points.append(point)
                rows.append((str(keep), label, str(clients), f"{point[3]:.1f}", f"{point[4] * 1e3:.0f}", f"{point[5] * 1e3:.0f}"))
                print(f"K={keep} {label} {clients} clients: {point[3]:.1f} req/s", file=sys.stderr)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tiny model, greedy, "
          f"{args.max_tokens} new tokens, one 451x300 JPEG per request")
    print(format_table([("K", "server", "clients", "req/s", "p50 ms", "p99 ms"), *rows]))
    _plot(points, args.plot)
    return 0


def _photo_url() -> str:
    import skimage.data
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(out, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _export(root: Path, keep: int) -> Path:
    directory = root / f"llava15-k{keep}-tiny"
    if not (directory / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "export", "llava15", "--keep", str(keep), "--model", "tiny",
                        "--out", str(directory)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return directory


class _server:
    """`python -m runtime.serve DIR FLAGS` on 127.0.0.1 and a free port; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, directory: Path, flags: list[str]):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [sys.executable, "-m", "runtime.serve", str(directory), "--port", str(self.port),
                        "--model-name", "bench", *flags]

    def __enter__(self) -> int:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}: {' '.join(self.command)}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                return self.port
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise SystemExit(f"the server did not answer /health within 120 s: {' '.join(self.command)}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _load(port: int, url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[float], float]:
    """`requests` chat requests from `clients` threads -> (per-request latency in s, wall time in s)."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    def one(_) -> float:
        start = time.perf_counter()
        client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens)
        return time.perf_counter() - start

    one(0)  # warm-up: first-call allocations are not the server's steady state
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, time.perf_counter() - started


def _plot(points: list[tuple], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no plot written to {path})", file=sys.stderr)
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for keep, label in sorted({(p[0], p[1]) for p in points}):
        line = [p for p in points if (p[0], p[1]) == (keep, label)]
        left.plot([p[2] for p in line], [p[3] for p in line], marker="o", label=f"K={keep}, {label}")
        right.plot([p[2] for p in line], [p[5] * 1e3 for p in line], marker="o", label=f"K={keep}, {label}")
    for axis, title in ((left, "throughput (requests/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

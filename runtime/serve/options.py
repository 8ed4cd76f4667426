"""The server's configuration: one frozen dataclass, each field one `python -m runtime.serve` flag."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from contract.errors import InputError

MAX_BATCH = 256  # largest --max-batch: far above what one CPU or GPU pipeline call is worth batching
MAX_WAIT_MS = 10_000.0  # largest --max-wait-ms: a batch window longer than 10 s is a mistake, not a choice
MIB = 1 << 20


@dataclass(frozen=True)
class ServeOptions:
    export_dir: Path  # directory written by python -m export
    host: str = "127.0.0.1"  # loopback unless told otherwise (0.0.0.0: every interface)
    port: int = 8000  # 0: any free port (tests)
    api_key_env: str | None = None  # name of the environment variable holding the API key; None: no key
    max_batch: int = 8  # requests run together in one pipeline call (1: no batching)
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_queue: int = 256  # requests waiting for the pipeline; beyond that 503 (the server is overloaded)
    allow_image_dir: Path | None = None  # images may also be local files under this directory (symlinks resolved)
    max_body_bytes: int = 16 * MIB  # a larger request body is refused with 413 before it is read whole
    max_image_bytes: int = 12 * MIB  # a larger encoded image (after base64 decoding) is refused with 413
    default_max_tokens: int = 64  # answer length when the request gives no max_tokens (as python -m runtime)
    model_name: str | None = None  # the name clients use; None: the export directory's name
    threads: int = 0  # ONNX Runtime intra-op threads (0: all cores)
    ray: bool = False  # deploy on Ray Serve instead of one uvicorn process
    replicas: int = 1  # Ray Serve replicas, each loading the export once

    def __post_init__(self):
        _int_in("port", self.port, 0, 65535)
        _int_in("max_batch", self.max_batch, 1, MAX_BATCH)
        _int_in("max_queue", self.max_queue, 1, 1_000_000)
        _int_in("max_body_bytes", self.max_body_bytes, 1024, 1 << 31)
        _int_in("max_image_bytes", self.max_image_bytes, 1, 1 << 31)
        _int_in("default_max_tokens", self.default_max_tokens, 1, 1 << 22)
        _int_in("replicas", self.replicas, 1, 1024)
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms <= MAX_WAIT_MS:
            raise InputError(f"max_wait_ms={self.max_wait_ms!r} must be a number of milliseconds in 0..{MAX_WAIT_MS:g}")
        if self.replicas > 1 and not self.ray:
            raise InputError(f"replicas={self.replicas} needs --ray (one process serves one replica)")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise InputError(f"--api-key-env {self.api_key_env}: the environment variable {self.api_key_env} is "
                             "unset or empty; set it to the key clients must send")
        if self.allow_image_dir is not None and not Path(self.allow_image_dir).is_dir():
            raise InputError(f"--allow-image-dir {str(self.allow_image_dir)!r} is not a directory")

    @property
    def api_key(self) -> str | None:
        return os.environ[self.api_key_env] if self.api_key_env else None

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.export_dir).resolve().name


def _int_in(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name}={value!r} must be an integer in {low}..{high}")

"""ONNX Runtime backend: one runner per graph, with a small lifecycle (activate / infer / deactivate,
also as a context manager) and feed checks against the graph's spec before anything runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.errors import InputError, ManifestError
from contract.manifest import NUMPY_DTYPES, GraphSpec, check_files


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtRunner:
    """Runs one graph of an export directory."""

    def __init__(self, directory: str | Path, spec: GraphSpec, providers: list[str] | None = None,
                 threads: int = 0, spin: bool = True):
        self.directory = Path(directory)
        self.spec = spec
        self.providers = providers or default_providers()
        self.threads = threads  # 0: ONNX Runtime's default (all physical cores)
        # Each session has its own thread pool, whose threads spin after a run waiting for more work. A
        # graph run once per query (vision, projector) must not spin: it would take the cores from the
        # next graph (measured: the LLM prefill right after the vision graph ran 40 % slower).
        self.spin = spin
        self.session: ort.InferenceSession | None = None

    # lifecycle --------------------------------------------------------------------------------------
    def activate(self) -> "OrtRunner":
        if self.session is not None:
            return self
        check_files(self.directory, self.spec)
        path = self.directory / self.spec.file
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ManifestError(f"cannot load {path}: {first[:300]}") from None
        names = {i.name for i in self.session.get_inputs()}
        expected = {t.name for t in self.spec.inputs}
        if names != expected:
            raise ManifestError(f"{path} has inputs {sorted(names)}, the manifest says {sorted(expected)}")
        return self

    def deactivate(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # running ----------------------------------------------------------------------------------------
    def check_feeds(self, feeds: dict) -> None:
        """Names, dtypes and shapes of `feeds` against the spec; named axes must agree across inputs."""
        expected = {t.name for t in self.spec.inputs}
        if set(feeds) != expected:
            missing, extra = sorted(expected - set(feeds)), sorted(set(feeds) - expected)
            raise InputError(f"{self.spec.file}: missing inputs {missing}, unexpected inputs {extra}")
        axes: dict[str, int] = {}
        for t in self.spec.inputs:
            value = feeds[t.name]
            shape = tuple(value.shape()) if isinstance(value, ort.OrtValue) else value.shape
            dtype = _dtype_name(value)
            if dtype != NUMPY_DTYPES[t.dtype]:
                raise InputError(f"{self.spec.file}: input {t.name!r} has dtype {dtype}, expected {t.dtype}")
            if len(shape) != len(t.shape):
                raise InputError(f"{self.spec.file}: input {t.name!r} has shape {shape}, expected {t.shape}")
            for size, dim in zip(shape, t.shape):
                if isinstance(dim, int) and size != dim:
                    raise InputError(f"{self.spec.file}: input {t.name!r} has shape {shape}, expected {t.shape}")
                if isinstance(dim, str) and axes.setdefault(dim, size) != size:
                    raise InputError(
                        f"{self.spec.file}: input {t.name!r} has {dim}={size}, other inputs have {axes[dim]}"
                    )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on numpy feeds; returns numpy outputs by name."""
        self._require_active()
        self.check_feeds(feeds)
        names = [t.name for t in self.spec.outputs]
        return dict(zip(names, self.session.run(names, feeds)))

    def infer_bound(self, feeds: dict[str, "np.ndarray | ort.OrtValue"], device: str = "cpu") -> dict[str, ort.OrtValue]:
        """Run with I/O binding: feeds may be OrtValues produced by an earlier call (a KV cache), outputs
        stay OrtValues on `device`, so nothing is converted to numpy or copied between calls."""
        self._require_active()
        self.check_feeds(feeds)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for t in self.spec.outputs:
            binding.bind_output(t.name, device)
        self.session.run_with_iobinding(binding)
        names = [t.name for t in self.spec.outputs]
        return dict(zip(names, binding.get_outputs()))

    def _require_active(self) -> None:
        if self.session is None:
            raise RuntimeError(f"runner for {self.spec.file} is not active: call activate() or use `with`")


def _dtype_name(value) -> str:
    if isinstance(value, ort.OrtValue):
        return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                "tensor(int32)": "int32"}.get(value.data_type(), value.data_type())
    return str(value.dtype)

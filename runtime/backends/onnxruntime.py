"""ONNX Runtime backend: one runner per graph implementing runtime.backends.base.Runner (activate / infer /
infer_bound / deactivate, also a context manager; feeds checked against the graph's spec before anything
runs), and `load`, which gives the pipeline its runners and the host splice step."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.errors import ManifestError
from contract.manifest import GraphSpec, Manifest, check_files
from runtime.backends.base import HostSplicer, activate_all, check_feeds, describe_array
from runtime.files import external_data


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtRunner:
    """Runs one graph of an export directory (a runtime.backends.base.Runner)."""

    def __init__(self, directory: str | Path, spec: GraphSpec, providers: list[str] | None = None,
                 threads: int = 0):
        self.directory = Path(directory)
        self.spec = spec
        self.providers = providers or default_providers()
        self.threads = threads  # 0: ONNX Runtime's default (all physical cores)
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
        # Each session has its own thread pool. Its threads spin while the session runs (faster hand-offs
        # between operators) and stop when the run returns: a pool still spinning after its run takes the
        # cores from the next session (measured on 2 cores: the LLM prefill right after the vision graph 40 %
        # slower; FEATHER's three decoder blocks, spinning, decoding at half speed). Measured on the bench
        # model against spinning only the LLM: vision 76 -> 61 ms, unpruned decode the same, FEATHER decode
        # 8.7 -> 19 tokens/s.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # External data from memory, not from ORT's own map of the file: see runtime/files.py (SIGBUS when a
        # mapped .data file is replaced in place). ORT keeps raw pointers until the session is created, then
        # has its own copy: `in_memory` must live until then, and goes when this method returns.
        in_memory = external_data(self.directory, self.spec.file, self.spec.sizes)
        if in_memory[0]:
            options.add_external_initializers_from_files_in_memory(*in_memory)
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ManifestError(f"cannot load {path}: {first[:300]}") from None
        for role, actual, declared in (("inputs", self.session.get_inputs(), self.spec.inputs),
                                       ("outputs", self.session.get_outputs(), self.spec.outputs)):
            names, expected = {i.name for i in actual}, {t.name for t in declared}
            if names != expected:
                raise ManifestError(f"{path} has {role} {sorted(names)[:6]}, the manifest says {sorted(expected)[:6]}: "
                                    "re-export")
        return self

    def deactivate(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # running ----------------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on numpy feeds; returns numpy outputs by name."""
        self._require_active()
        check_feeds(self.spec, feeds, _describe)
        names = [t.name for t in self.spec.outputs]
        return dict(zip(names, self.session.run(names, feeds)))

    def infer_bound(self, feeds: dict[str, "np.ndarray | ort.OrtValue"], into: dict[str, np.ndarray] | None = None,
                    device: str = "cpu", handles: dict | None = None) -> dict[str, "ort.OrtValue | np.ndarray"]:
        """Run with I/O binding: feeds may be OrtValues produced by an earlier call (a KV cache), outputs
        stay OrtValues on `device`, so nothing is converted to numpy or copied between calls. `into`: outputs
        written into these host arrays instead (returned as they are); an array that is also a feed is bound
        as both, by address (a KV buffer that GroupQueryAttention updates in place). `handles`: a dict the
        caller keeps as long as those arrays (the KV cache's): their OrtValues are made once and reused while
        the same arrays come back, instead of two per buffer per step, and so is the I/O binding: a buffer bound
        to the same name at the last call is not bound again."""
        self._require_active()
        check_feeds(self.spec, feeds, _describe)
        into = into or {}
        kept = None if handles is None else handles.get(_Bound)
        state = kept if kept is not None and kept.session is self.session else _Bound(self.session)
        state.view(into.values())
        if handles is not None:
            handles[_Bound] = state
        binding = state.binding
        for name, value in feeds.items():
            handle = value if isinstance(value, ort.OrtValue) else state.views.get(id(value), (None, None))[1]
            if handle is None:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
                state.names.pop(name, None)
            elif state.names.get(name) is not handle:
                binding.bind_ortvalue_input(name, handle)
                state.names[name] = handle
        for t in self.spec.outputs:
            if t.name not in into:
                binding.bind_output(t.name, device)
                continue
            handle = state.views[id(into[t.name])][1]
            if state.names.get((OUTPUT, t.name)) is not handle:
                binding.bind_ortvalue_output(t.name, handle)
                state.names[(OUTPUT, t.name)] = handle
        self.session.run_with_iobinding(binding)
        outputs = dict(zip([t.name for t in self.spec.outputs], binding.get_outputs()))
        return {**outputs, **into}

    def _require_active(self) -> None:
        if self.session is None:
            raise RuntimeError(f"runner for {self.spec.file} is not active: call activate() or use `with`")


OUTPUT = "output"  # (OUTPUT, name): an output's entry in _Bound.names (inputs are keyed by their name)


class _Bound:
    """What infer_bound keeps in a caller's `handles` between calls (under the key _Bound): OrtValue views of the
    caller's shared host arrays (views, no copy) and one I/O binding of the session, with the value each name is
    bound to. Only the arrays of the latest call are kept, so a buffer the KV cache replaced (grown) is freed."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.binding = session.io_binding()
        self.views: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}  # id(array) -> (the array, its view)
        self.names: dict = {}  # input name or (OUTPUT, name) -> the OrtValue bound to it

    def view(self, arrays) -> None:
        """Views of exactly these arrays: reused where the same array was viewed before, made otherwise."""
        views = {}
        for array in arrays:
            hit = self.views.get(id(array))
            views[id(array)] = hit if hit is not None and hit[0] is array else (array, ort.OrtValue.ortvalue_from_numpy(array))
        self.views = views


def _describe(value) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a numpy feed or of an OrtValue (a bound output fed back)."""
    if isinstance(value, ort.OrtValue):
        dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                 "tensor(int32)": "int32"}.get(value.data_type(), value.data_type())
        return tuple(value.shape()), dtype
    return describe_array(value)


def load(directory: Path, manifest: Manifest, providers: list[str] | None = None, threads: int = 0
         ) -> tuple[dict[str, OrtRunner], HostSplicer]:
    """Active runners for every graph of the manifest, and the host splice step."""
    runners = {name: OrtRunner(directory, spec, providers, threads) for name, spec in manifest.graphs.items()}
    return activate_all(runners), HostSplicer()

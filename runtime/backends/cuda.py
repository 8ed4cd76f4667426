"""CUDA for the TensorRT backend through cuda-python, NVIDIA's maintained binding (no torch, no pycuda):
device memory, a stream, copies, device properties and CUDA-graph capture.

Written against the cuda-bindings runtime API (`cuda.bindings.runtime`, cuda-python >= 12.6; 12.0-12.5
call the same module `cuda.cudart`): every call returns `(cudaError_t, *values)`, which `_call` turns into
the values or a one-line CudaError. Docs: https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html
(cudaMalloc, cudaMemcpyAsync, cudaStreamCreateWithFlags, cudaGetDeviceProperties, cudaStreamBeginCapture,
cudaStreamEndCapture, cudaGraphInstantiate, cudaGraphLaunch). Polygraphy's `polygraphy.cuda` has memory and
streams but no graph capture or device properties, hence cuda-python.

Verified here only without a GPU: the module imports and reports "no CUDA driver" as one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract.errors import UserError

_INSTALL = ("the TensorRT backend needs cuda-python (NVIDIA's CUDA binding): pip install 'cuda-python>=12.6,<13' "
            "for CUDA 12 (JetPack 6), 'cuda-python>=13,<14' for CUDA 13")


class CudaError(UserError):
    """A CUDA runtime call failed (no driver, no device, out of memory): one line, exit code 2 in the CLIs."""


def _runtime():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python 12.0 - 12.5
        except ImportError:
            raise CudaError(_INSTALL) from None
    return runtime


class Cuda:
    """The calls the backend makes, on one device. Construct once per process (`cuda()`)."""

    def __init__(self):
        self.rt = _runtime()

    def _call(self, what: str, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(err)
            hint = {"cudaErrorInsufficientDriver": ": no NVIDIA driver on this machine",
                    "cudaErrorNoDevice": ": no CUDA device", "cudaErrorMemoryAllocation": ": out of device memory"}
            raise CudaError(f"CUDA {what} failed with {name}{hint.get(name, '')}")
        return values[0] if len(values) == 1 else tuple(values)

    # device ---------------------------------------------------------------------------------------
    def device(self, index: int = 0) -> "Device":
        prop = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
        name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
        return Device(index, name, f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))

    # memory and copies ----------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", self.rt.cudaFree(ptr))

    def upload(self, dst: int, host: np.ndarray, stream) -> None:
        """Host array -> device (pageable host memory: returns once the source may be reused)."""
        if host.nbytes:
            host = np.ascontiguousarray(host)
            self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(
                dst, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, host: np.ndarray, src: int, stream) -> None:
        """Device -> host array (C-contiguous), synchronising the stream."""
        if host.nbytes:
            self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(
                host.ctypes.data, src, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        self.synchronize(stream)

    def copy(self, dst: int, src: int, nbytes: int, stream) -> None:
        """Device -> device, ordered on the stream."""
        if nbytes:
            self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(
                dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    # streams and graphs ---------------------------------------------------------------------------
    def stream(self):
        """A non-blocking stream (graph capture is not allowed on the legacy default stream)."""
        return self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def synchronize(self, stream) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def destroy_stream(self, stream) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def capture(self, stream, enqueue) -> object:
        """Record what `enqueue()` puts on `stream` into an instantiated CUDA graph (not run)."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(stream, mode))
        try:
            enqueue()
        finally:
            graph = self._call("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(stream))
        try:
            return self._call("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(graph, 0))
        finally:
            self._call("cudaGraphDestroy", self.rt.cudaGraphDestroy(graph))

    def launch(self, graph_exec, stream) -> None:
        self._call("cudaGraphLaunch", self.rt.cudaGraphLaunch(graph_exec, stream))

    def destroy_graph(self, graph_exec) -> None:
        self._call("cudaGraphExecDestroy", self.rt.cudaGraphExecDestroy(graph_exec))


@dataclass(frozen=True)
class Device:
    index: int
    name: str  # "Orin", "NVIDIA H100 80GB HBM3", ...
    compute_capability: str  # "8.7"
    memory: int  # bytes of device memory (on Jetson: the memory shared with the CPU)


_CUDA: Cuda | None = None


def cuda() -> Cuda:
    global _CUDA
    if _CUDA is None:
        _CUDA = Cuda()
    return _CUDA

"""TensorRT backend: the engines `python -m engines build` wrote, run with name-based tensor I/O.
`tensorrt` is imported in this module only, and only when a runner activates.

    TrtRunner       one engine, a runtime.backends.base.Runner (activate / infer / infer_bound / deactivate, a
                    context manager, feeds checked by base.check_feeds). Device buffers are allocated once, at
                    the largest shapes the engine's optimization profiles allow, and reused; outputs stay on
                    the device (DeviceTensor).
    DeviceSplicer   the splice step: with the `single` layout the image embeddings never leave the device and
                    are copied into the (first) LLM engine's input buffer; other layouts order tokens on the host.
    load            what Pipeline.load(dir, backend="trt") asks for: active runners and the DeviceSplicer.

KV cache on the device: every output has two buffers, and an output fed back as an input (present.i of
step t becomes past.i of step t+1) makes the next call write the other one, so present and past swap
pointers each step and nothing is copied besides the graph's own concat (as with ONNX Runtime's I/O binding).
Each LLM engine (`llm`, or each decoder block llm.0, llm.1, ... of a FEATHER / FastV export) has two profiles
(prefill, decode; see engines/plan.py); each call runs on the first profile whose ranges contain its shapes.
Blocks are separate runners with their own KV buffers (runtime.generation: one KVCache per block). In decode a
block's hidden_states output is fed to the next block as a DeviceTensor, bound by address (the next block runs
before this one writes that buffer again); in prefill the next block gets the kept tokens gathered on the
host after the select graph, uploaded into its own input buffer.

CUDA graphs (`cuda_graphs=True`): a call is captured after it first runs, keyed by profile, shapes and
addresses, and replayed when the same key comes again. Static graphs (vision, projector at a fixed batch)
replay from the second query on. The exported LLM's KV cache grows by one token per step, so a decode
step's shapes are new within a generation: decode graphs replay only across generations with the same
prompt length (benchmarks, repeated queries); a fixed-capacity in-place cache graph would be needed for more.
Each block captures its own graphs (keyed by its own shapes: a block after a prune point has a shorter cache).

Written against the TensorRT Python API (10.x and 11.x) (README, "What is verified, and what is not"):
  Runtime.deserialize_cuda_engine (an IStreamReader / IStreamReaderV2 reading the file, not a 14 GB bytes copy)
      https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html
  ICudaEngine num_io_tensors, get_tensor_name, get_tensor_mode, get_tensor_dtype, get_tensor_shape,
      num_optimization_profiles, get_tensor_profile_shape, create_execution_context
      https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  IExecutionContext set_optimization_profile_async, set_input_shape, get_tensor_shape, set_tensor_address,
      execute_async_v3   https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  Migrating 10.x -> 11.x (IStreamReader -> IStreamReaderV2): https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from contract import engine_meta, names
from contract.errors import InputError, ManifestError
from contract.manifest import NUMPY_DTYPES, GraphSpec, Manifest
from runtime.backends.base import HostSplicer, activate_all, check_feeds
from runtime.backends.cuda import CudaError, cuda
from runtime.layout import Single

MAX_CUDA_GRAPHS = 64  # captured graphs kept per runner (least recently used dropped)


def import_tensorrt():
    """The tensorrt module, or one line saying how to get it."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError when libnvinfer itself is missing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(
            f"backend 'trt' needs TensorRT's Python package and `import tensorrt` failed ({first}): on Jetson it "
            "comes with JetPack 6.1+ (apt install python3-libnvinfer), elsewhere pip install tensorrt; or use "
            "backend 'onnxruntime'") from None
    return tensorrt


_LOGGER = None


def trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _reader(trt, path: Path):
    """The engine file as a TensorRT stream reader: deserialized without a host copy of the whole engine
    (on Jetson the host and the GPU share memory, so a copy would double the peak)."""
    base = getattr(trt, "IStreamReaderV2", None) or trt.IStreamReader  # 11.x / 10.x

    class Reader(base):
        def __init__(self):
            base.__init__(self)  # the pybind11 trampoline must be initialised explicitly
            self.file = open(path, "rb")

        def read(self, size: int, stream=None) -> bytes:  # V2 passes a CUDA stream: we read host memory
            return self.file.read(size)

        def seek(self, offset: int, whence: int = 0) -> int:
            return self.file.seek(offset, int(whence))

    return Reader()


class DeviceTensor:
    """A tensor in device memory: pointer, shape and dtype of a view into a runner's buffer. It stays valid
    until that runner writes the buffer again (the same output two calls later, or the same input)."""

    __slots__ = ("ptr", "shape", "dtype", "runner")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype, runner: "TrtRunner"):
        self.ptr, self.shape, self.dtype, self.runner = ptr, tuple(int(d) for d in shape), np.dtype(dtype), runner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> "DeviceTensor":
        """The view of rows start:stop of the first axis."""
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return DeviceTensor(self.ptr + start * row, (stop - start, *self.shape[1:]), self.dtype, self.runner)

    def numpy(self) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        cuda().download(host, self.ptr, self.runner.stream)
        return host

    def __repr__(self) -> str:
        return f"DeviceTensor(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype})"


class TrtRunner:
    """Runs one engine of an export directory."""

    def __init__(self, directory: str | Path, graph: str, spec: GraphSpec, cuda_graphs: bool = False):
        self.directory = Path(directory)
        self.graph = graph
        self.spec = spec
        self.cuda_graphs = cuda_graphs
        self.context = None

    # lifecycle --------------------------------------------------------------------------------------
    def activate(self) -> "TrtRunner":
        if self.context is not None:
            return self
        meta = engine_meta.check_engine(self.directory, self.graph)  # missing or stale: before TensorRT loads
        trt = import_tensorrt()
        device = cuda().device()
        engine_meta.check_engine(self.directory, self.graph, trt.__version__, device.compute_capability)
        path = engine_meta.engine_path(self.directory, self.graph)
        engine = trt.Runtime(trt_logger(trt)).deserialize_cuda_engine(_reader(trt, path))
        if engine is None:
            raise ManifestError(f"TensorRT could not deserialize {path} (its log above says why); "
                                f"{engine_meta.rebuild_hint(self.directory)}")
        self.trt, self.engine, self.meta = trt, engine, meta
        self._check_io()
        self.context = engine.create_execution_context()
        self.stream = cuda().stream()
        self.handle = int(self.stream)
        self.profiles = [self._profile(p) for p in range(engine.num_optimization_profiles)]
        self.profile = -1
        self._inputs: dict[str, int] = {}  # lazily allocated at the profile maximum
        self._outputs: dict[str, list[int | None]] = {}  # two buffers per output (see the module doc)
        self._graphs: OrderedDict = OrderedDict()
        self._dummy = cuda().malloc(256)  # the address of empty inputs (a prefill's past of length 0)
        self._sizes = self._max_bytes()
        return self

    def deactivate(self) -> None:
        if self.context is None:
            return
        for graph_exec in self._graphs.values():
            cuda().destroy_graph(graph_exec)
        for ptr in [*self._inputs.values(), *(p for pair in self._outputs.values() for p in pair if p), self._dummy]:
            cuda().free(ptr)
        cuda().destroy_stream(self.stream)
        self.context = self.engine = None
        self._graphs.clear()

    def __enter__(self) -> "TrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _check_io(self) -> None:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        if inputs != {t.name for t in self.spec.inputs} or set(names) - inputs != {t.name for t in self.spec.outputs}:
            raise ManifestError(f"the {self.graph!r} engine's tensors {sorted(names)} are not the manifest's: "
                                f"{engine_meta.rebuild_hint(self.directory)}")
        for t in (*self.spec.inputs, *self.spec.outputs):
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(t.name)))
            if dtype != np.dtype(NUMPY_DTYPES[t.dtype]):
                raise ManifestError(f"the {self.graph!r} engine's {t.name!r} is {dtype}, the manifest says {t.dtype}: "
                                    f"{engine_meta.rebuild_hint(self.directory)}")

    def _profile(self, index: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) shapes of one optimization profile."""
        ranges = {}
        for t in self.spec.inputs:
            static = tuple(self.engine.get_tensor_shape(t.name))
            if -1 in static:
                ranges[t.name] = tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(t.name, index))
            else:
                ranges[t.name] = (static, static, static)
        return ranges

    def _select(self, profile: int) -> None:
        if not self.context.set_optimization_profile_async(profile, self.handle):
            raise RuntimeError(f"TensorRT refused optimization profile {profile} of the {self.graph!r} engine")
        self.profile = profile

    def _max_bytes(self) -> dict[str, int]:
        """Bytes of each tensor at the largest shapes any profile allows (outputs: as TensorRT infers them
        from every input at its maximum, which the profiles keep consistent: total = past + sequence)."""
        sizes: dict[str, int] = {}
        for index, ranges in enumerate(self.profiles):
            self._select(index)
            for name, (_, _, largest) in ranges.items():
                self._set_shape(name, largest)
            for t in (*self.spec.inputs, *self.spec.outputs):
                shape = ranges[t.name][2] if t.name in ranges else tuple(self.context.get_tensor_shape(t.name))
                size = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[t.dtype]).itemsize
                sizes[t.name] = max(sizes.get(t.name, 0), size)
        cuda().synchronize(self.stream)
        return sizes

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if tuple(self.context.get_tensor_shape(name)) != tuple(shape):
            if not self.context.set_input_shape(name, tuple(shape)):
                raise InputError(f"the {self.graph!r} engine refused {name!r} of shape {tuple(shape)}")

    # running ----------------------------------------------------------------------------------------
    def input_tensor(self, name: str, shape: tuple[int, ...]) -> DeviceTensor:
        """A view on this runner's own buffer for input `name`: write into it, then feed it back (no copy)."""
        self._require_active()
        spec = self.spec.input(name)
        view = DeviceTensor(self._input_buffer(name), shape, NUMPY_DTYPES[spec.dtype], self)
        if view.nbytes > self._sizes[name]:
            raise InputError(f"{name!r} of shape {tuple(shape)} is larger than the {self.graph!r} engine allows: "
                             f"{engine_meta.rebuild_hint(self.directory)} with a larger --max-batch/--max-seq-len")
        return view

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run on numpy (or device) feeds; returns numpy outputs by name."""
        return {name: value.numpy() for name, value in self.infer_bound(feeds).items()}

    def infer_bound(self, feeds: dict, into: dict | None = None, handles: dict | None = None) -> dict[str, DeviceTensor]:
        """Run with outputs left on the device. A DeviceTensor feed is bound by address (a KV cache from the
        previous step, an output of another engine); a numpy feed is copied into this runner's buffer. The
        stream is synchronised before returning, so host clocks around a call measure the engine. `into` (a
        host KV buffer, --target onnxruntime exports only) is refused: `load` never accepts such an export."""
        self._require_active()
        if into:
            raise InputError(f"{self.graph!r}: TensorRT engines do not write outputs into host buffers (`into`)")
        check_feeds(self.spec, feeds)  # DeviceTensors are described by their .shape and .dtype, as arrays
        shapes = {name: tuple(int(d) for d in value.shape) for name, value in feeds.items()}
        profile = self._choose_profile(shapes)
        if profile != self.profile:
            self._select(profile)
        bound = []
        for t in self.spec.inputs:
            value = feeds[t.name]
            if isinstance(value, DeviceTensor):
                ptr = value.ptr
            elif value.nbytes == 0:
                ptr = self._dummy
            else:
                ptr = self._input_buffer(t.name)
                cuda().upload(ptr, np.asarray(value), self.stream)
            self._set_shape(t.name, shapes[t.name])
            self._address(t.name, ptr)
            bound.append(ptr)
        outputs = {}
        for t in self.spec.outputs:
            outputs[t.name] = self._output_buffer(t.name, avoid=set(bound))
            self._address(t.name, outputs[t.name])
        self._execute((profile, tuple(shapes.items()), tuple(bound), tuple(outputs.values())))
        result = {t.name: DeviceTensor(outputs[t.name], tuple(self.context.get_tensor_shape(t.name)),
                                       NUMPY_DTYPES[t.dtype], self) for t in self.spec.outputs}
        cuda().synchronize(self.stream)
        return result

    def _choose_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index, ranges in enumerate(self.profiles):
            if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[name], low, high))
                   for name, (low, _, high) in ranges.items()):
                return index
        largest = {name: ranges[name][2] for ranges in self.profiles for name in ranges}
        raise InputError(f"the {self.graph!r} engine was built for shapes up to {largest}; got {shapes}: "
                         f"{engine_meta.rebuild_hint(self.directory)} with a larger --max-batch/--max-seq-len")

    def _input_buffer(self, name: str) -> int:
        if name not in self._inputs:
            self._inputs[name] = cuda().malloc(self._sizes[name])
        return self._inputs[name]

    def _output_buffer(self, name: str, avoid: set[int]) -> int:
        pair = self._outputs.setdefault(name, [None, None])
        for i in range(2):
            if pair[i] is None:
                pair[i] = cuda().malloc(self._sizes[name])
            if pair[i] not in avoid:
                return pair[i]
        raise RuntimeError(f"both buffers of {name!r} are bound as inputs")  # needs the same tensor fed twice

    def _address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise RuntimeError(f"TensorRT refused the address of {name!r} in the {self.graph!r} engine")

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.handle):
            raise RuntimeError(f"TensorRT's execute_async_v3 failed for the {self.graph!r} engine (its log says why)")

    def _execute(self, key) -> None:
        if not self.cuda_graphs:
            self._enqueue()
            return
        graph_exec = self._graphs.get(key)
        if graph_exec is not None:
            self._graphs.move_to_end(key)
            cuda().launch(graph_exec, self.stream)
            return
        self._enqueue()  # a plain run first: it also does TensorRT's shape-dependent setup outside the capture
        try:
            self._graphs[key] = cuda().capture(self.stream, self._enqueue)
        except CudaError as exc:  # an engine TensorRT cannot run inside a capture: keep running it plainly
            print(f"warning: CUDA graphs disabled for the {self.graph!r} engine ({exc})", file=sys.stderr)
            self.cuda_graphs = False
            return
        if len(self._graphs) > MAX_CUDA_GRAPHS:
            cuda().destroy_graph(self._graphs.popitem(last=False)[1])

    def _require_active(self) -> None:
        if self.context is None:
            raise RuntimeError(f"runner for the {self.graph!r} engine is not active: call activate() or use `with`")


class DeviceSplicer(HostSplicer):
    """The splice step on the device. With the `single` layout the projector's output never leaves the
    device: the text embeddings are uploaded into the first LLM engine's input buffer (`llm`, or block llm.0)
    and each image's tokens are copied device-to-device into their rows. Other layouts reorder tokens on the
    host (HostSplicer's path)."""

    def __init__(self, llm: TrtRunner):
        self.llm = llm

    def tokens(self, layout, embeds, kept, items):
        if not (isinstance(layout, Single) and isinstance(embeds, DeviceTensor)):
            return super().tokens(layout, embeds, kept, items)
        return [embeds.rows(part.start, part.stop) for part, _ in items]  # [1, K, D] each, on the device

    def fill(self, text, visual):
        if not all(isinstance(tokens, DeviceTensor) for _, _, tokens in visual):
            return super().fill(text, visual)
        embeds = self.llm.input_tensor(names.INPUTS_EMBEDS, text.shape)  # [B, S, D], the LLM engine's own buffer
        cuda().upload(embeds.ptr, text, self.llm.stream)
        row_bytes = text.shape[2] * text.itemsize
        for row, at, tokens in visual:
            cuda().copy(embeds.ptr + (row * text.shape[1] + at) * row_bytes, tokens.ptr, tokens.nbytes, self.llm.stream)
        return embeds


def load(directory: Path, manifest: Manifest, cuda_graphs: bool = False) -> tuple[dict[str, TrtRunner], DeviceSplicer]:
    """Active runners for every engine of the export directory, and the device splice step."""
    if manifest.target != "standard":
        raise ManifestError(f"{directory} was exported with --target {manifest.target} (ONNX Runtime's own attention "
                            "operator): TensorRT runs --target standard exports only; re-export, or use the "
                            "onnxruntime backend")
    for name in manifest.graphs:  # every missing or stale engine is found before TensorRT is imported
        engine_meta.check_engine(directory, name)
    runners = activate_all({name: TrtRunner(directory, name, spec, cuda_graphs) for name, spec in manifest.graphs.items()})
    first, _ = manifest.blocks()[0]  # the LLM graph the spliced embeddings go to: `llm`, or llm.0
    return runners, DeviceSplicer(runners[first])

"""The TensorRT backend's parts that need no GPU: which optimization profile a call runs on (with the
profiles engines.plan gives the builder), device-tensor views, the shared feed checks, the device splice
(on a fake device memory: the bytes the LLM engine would read) and one-line refusals. The backend running
engines is tested in tests/engines/test_tensorrt.py where TensorRT is installed."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from contract.errors import InputError
from contract.manifest import Manifest
from engines import plan as engine_plan
from runtime.backends import tensorrt
from runtime.backends.base import Runner, check_feeds
from runtime.backends.tensorrt import DeviceSplicer, DeviceTensor, TrtRunner
from runtime.pipeline import Timings
from tests.helpers import PROMPTS, ROOT

KEEP = 32


def llm_runner(export_dir, max_seq_len=64) -> TrtRunner:
    """A runner that is not activated, given the profiles `python -m engines build` would build."""
    manifest = Manifest.read(export_dir)
    plans = engine_plan.plan(manifest, engine_plan.BuildOptions(export_dir, max_seq_len=max_seq_len), major=10)
    runner = TrtRunner(export_dir, "llm", manifest.graphs["llm"])
    llm = next(p for p in plans if p.graph == "llm")
    runner.profiles = [p.shapes for p in llm.profiles]  # TensorRT reports the same ranges back
    return runner


def llm_shapes(manifest, batch, new, past):
    sizes = {"batch": batch, "sequence": new, "past_sequence": past, "total_sequence": past + new}
    return {t.name: tuple(sizes.get(d, d) for d in t.shape) for t in manifest.graphs["llm"].inputs}


def test_prefill_and_decode_run_on_their_profiles(tiny_export):
    manifest = Manifest.read(tiny_export(KEEP))
    runner = llm_runner(tiny_export(KEEP))
    assert runner._choose_profile(llm_shapes(manifest, 1, 50, 0)) == 0  # the whole prompt, empty cache
    assert runner._choose_profile(llm_shapes(manifest, 1, 1, 50)) == 1  # one token on 50 cached
    assert runner._choose_profile(llm_shapes(manifest, 1, 1, 63)) == 1  # the last token that fits
    with pytest.raises(InputError) as raised:
        runner._choose_profile(llm_shapes(manifest, 1, 1, 64))
    assert "--max-seq-len" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(InputError):
        runner._choose_profile(llm_shapes(manifest, 2, 1, 10))  # built for batch 1


def test_device_tensor_views():
    tensor = DeviceTensor(0x1000, (4, 32, 128), np.float32, runner=None)
    assert tensor.nbytes == 4 * 32 * 128 * 4
    row = tensor.rows(2, 3)
    assert row.ptr == 0x1000 + 2 * 32 * 128 * 4 and row.shape == (1, 32, 128) and row.dtype == np.float32


def test_runner_protocol_and_shared_feed_checks(tiny_export):
    runner = llm_runner(tiny_export(KEEP))
    assert isinstance(runner, Runner)
    manifest = Manifest.read(tiny_export(KEEP))
    feeds = {name: np.zeros(shape, np.int64 if name in ("attention_mask", "position_ids") else np.float32)
             for name, shape in llm_shapes(manifest, 1, 3, 0).items()}
    check_feeds(runner.spec, feeds)
    feeds["inputs_embeds"] = DeviceTensor(0x1000, (1, 3, manifest.llm.hidden_size), np.float16, runner)
    with pytest.raises(InputError) as raised:
        check_feeds(runner.spec, feeds)  # a DeviceTensor is described by its .shape and .dtype
    assert "inputs_embeds" in str(raised.value) and "float16" in str(raised.value)
    with pytest.raises(RuntimeError):
        runner.infer({})  # not activated


def test_backend_imports_neither_the_pipeline_nor_onnxruntime():
    script = ("import sys, runtime.backends.tensorrt; "
              "print(sorted(m for m in sys.modules if m in ('runtime.pipeline', 'onnxruntime', 'tensorrt')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


class FakeDevice:
    """cuda()'s copies on a numpy byte array: a pointer is an offset into `memory`."""

    def __init__(self, nbytes: int):
        self.memory = np.zeros(nbytes, np.uint8)
        self.top = 256  # pointer 0 stays unused

    def put(self, host: np.ndarray) -> int:
        ptr, self.top = self.top, self.top + host.nbytes
        self.upload(ptr, host, None)
        return ptr

    def upload(self, dst, host, stream):
        self.memory[dst:dst + host.nbytes] = np.ascontiguousarray(host).view(np.uint8).reshape(-1)

    def download(self, host, src, stream):
        host.reshape(-1).view(np.uint8)[:] = self.memory[src:src + host.nbytes]

    def copy(self, dst, src, nbytes, stream):
        self.memory[dst:dst + nbytes] = self.memory[src:src + nbytes].copy()

    def read(self, tensor: DeviceTensor) -> np.ndarray:
        return self.memory[tensor.ptr:tensor.ptr + tensor.nbytes].view(tensor.dtype).reshape(tensor.shape)


class FakeLLM:
    """The LLM runner's part the splicer uses: its own inputs_embeds buffer and its stream."""

    stream = None

    def __init__(self, device: FakeDevice, capacity: int):
        self.buffer = device.put(np.zeros(capacity, np.uint8))

    def input_tensor(self, name, shape):
        assert name == "inputs_embeds"
        return DeviceTensor(self.buffer, shape, np.float32, self)


def test_device_splice_writes_what_the_host_splice_computes(tiny_export, pipeline, photos, monkeypatch):
    """The LLM engine's input after the device splice (text uploaded, visual rows copied device to device)
    holds exactly the host splice's inputs_embeds, for prompts of different lengths (left padding)."""
    host = pipeline(KEEP)
    ids = [host.prompt_ids(p) for p in PROMPTS[:2]]
    visual, kept = host.encode([photos["chelsea"], photos["coffee"]], "image", Timings())  # [K, D] each
    want, want_mask = host.splice(ids, visual)

    device = FakeDevice(1 << 24)
    monkeypatch.setattr(tensorrt, "cuda", lambda: device)
    projected = np.stack(visual)  # [B, K, D], as the projector engine leaves it
    embeds = DeviceTensor(device.put(projected), projected.shape, np.float32, runner=None)
    splicer = DeviceSplicer(FakeLLM(device, want.nbytes))
    items = [(slice(i, i + 1), (0, 0)) for i in range(len(visual))]
    on_device = splicer.tokens(host.layouts["image"], embeds, np.concatenate(kept), items)
    assert [(t.ptr, t.shape) for t in on_device] == [(embeds.ptr + i * projected[0].nbytes, (1, KEEP, projected.shape[2]))
                                                     for i in range(len(visual))]
    pipe = copy.copy(host)
    pipe.splicer = splicer
    got, mask = pipe.splice(ids, on_device)
    assert isinstance(got, DeviceTensor) and got.shape == want.shape
    np.testing.assert_array_equal(mask, want_mask)
    worst = float(np.abs(device.read(got) - want).max())
    assert worst == 0.0, f"device splice differs from the host splice by {worst}"
    # Host tokens (a layout other than `single`) take the host path: numpy out.
    np.testing.assert_array_equal(splicer.fill(np.zeros((1, 2, 3), np.float32), [(0, 1, np.ones((1, 3), np.float32))]),
                                  [[[0, 0, 0], [1, 1, 1]]])


def test_no_gpu_is_one_line():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (the tensorrt extra)")
    from runtime.backends.cuda import CudaError, cuda

    try:
        device = cuda().device()
    except CudaError as exc:
        assert "\n" not in str(exc) and "cudaGetDeviceProperties" in str(exc)
    else:
        pytest.skip(f"a GPU is present ({device.name})")

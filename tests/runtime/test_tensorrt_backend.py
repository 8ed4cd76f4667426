"""The TensorRT backend's parts that need no GPU: which optimization profile a call runs on (with the
profiles engines.plan gives the builder), device-tensor views, and one-line refusals. The backend running
engines is tested in tests/engines/test_tensorrt.py where TensorRT is installed."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import InputError
from contract.manifest import Manifest
from engines import plan as engine_plan
from runtime.backends.tensorrt import DeviceTensor, TrtRunner

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


def test_feed_checks_are_ortrunners(tiny_export):
    runner = llm_runner(tiny_export(KEEP))
    manifest = Manifest.read(tiny_export(KEEP))
    feeds = {name: np.zeros(shape, np.int64 if name in ("attention_mask", "position_ids") else np.float32)
             for name, shape in llm_shapes(manifest, 1, 3, 0).items()}
    runner.check_feeds(feeds)
    feeds["inputs_embeds"] = DeviceTensor(0x1000, (1, 3, manifest.llm.hidden_size), np.float16, runner)
    with pytest.raises(InputError) as raised:
        runner.check_feeds(feeds)
    assert "inputs_embeds" in str(raised.value) and "float16" in str(raised.value)
    with pytest.raises(RuntimeError):
        runner.infer({})  # not activated


def test_no_gpu_is_one_line():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (the tensorrt extra)")
    from runtime.backends.cuda import CudaError, cuda

    try:
        device = cuda().device()
    except CudaError as exc:
        assert "\n" not in str(exc) and "cudaGetDeviceProperties" in str(exc)
    else:
        pytest.skip(f"a GPU is present ({device.name})")

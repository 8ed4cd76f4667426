"""Real TensorRT: build the tiny export's engines, check them against ONNX Runtime, run the runtime's TensorRT
backend. Skipped where `tensorrt` (and a GPU) are not available: nothing here is ever simulated.

    python -m pytest tests/engines/test_tensorrt.py -v      # on a machine with TensorRT 10.x/11.x and a GPU
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (no GPU build machine): the engine "
                                             "build, check and TensorRT runtime paths are unverified on this machine")
pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install 'cuda-python>=12.6')")

from contract import engine_meta  # noqa: E402
from contract.manifest import Manifest  # noqa: E402
from engines.build import build  # noqa: E402
from engines.check import check  # noqa: E402
from engines.plan import BuildOptions  # noqa: E402
from runtime.backends.cuda import CudaError, cuda  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402

KEEP = 32
PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def built(tiny_export, tmp_path_factory):
    try:
        cuda().device()
    except CudaError as exc:
        pytest.skip(f"no usable GPU: {exc}")
    directory = Path(shutil.copytree(tiny_export(KEEP), tmp_path_factory.mktemp("trt") / "k32"))
    outcomes = build(BuildOptions(directory, precision="fp32", max_seq_len=512,  # fp32: TensorRT 10 and 11 alike
                                  timing_cache=directory / "timing.cache"))
    assert all(o.status.startswith("built") for o in outcomes)
    return directory


def test_engines_and_metadata(built):
    for graph in ("vision", "projector", "llm"):
        meta = engine_meta.check_engine(built, graph, trt.__version__, cuda().device().compute_capability)
        assert meta.tensorrt == trt.__version__
    assert [p["name"] for p in engine_meta.read_meta(built, "llm").profiles] == ["prefill", "decode"]
    again = build(BuildOptions(built, precision="fp32", max_seq_len=512))
    assert all(o.status == "up to date" for o in again)


def test_check_against_onnxruntime(built, photos):
    rows = check(built, {name: photos[name] for name in ("chelsea", "portrait")})
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runtime_backend_matches_onnxruntime(built, photos, pipeline, cuda_graphs):
    engines = Pipeline.load(built, backend="trt", cuda_graphs=cuda_graphs)
    reference = pipeline(KEEP)
    for _ in range(2):  # the second query replays captured graphs
        got = engines.generate([photos["chelsea"], photos["coffee"]], [PROMPT, PROMPT], max_new_tokens=12,
                               return_logits=True)
        want = reference.generate([photos["chelsea"], photos["coffee"]], [PROMPT, PROMPT], max_new_tokens=12,
                                  return_logits=True)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.kept_indices, b.kept_indices)
            worst = max(float(np.abs(x - y).max()) for x, y in zip(a.logits, b.logits))
            assert worst < 1e-2, f"logits differ by {worst:.3g}"
            assert a.token_ids == b.token_ids


@pytest.fixture(scope="module")
def built_feather(export_dir, tmp_path_factory):
    """The FEATHER export's engines: a block engine per llm.i, one per select graph."""
    try:
        cuda().device()
    except CudaError as exc:
        pytest.skip(f"no usable GPU: {exc}")
    source = export_dir("llava15", None, method="feather")
    directory = Path(shutil.copytree(source, tmp_path_factory.mktemp("trt") / "feather"))
    outcomes = build(BuildOptions(directory, precision="fp32", max_batch=2, max_seq_len=1024))  # 576 image tokens
    assert all(o.status.startswith("built") for o in outcomes)
    return directory


def test_feather_blocks_and_select_graphs(built_feather, export_dir, photos):
    """Every block has prefill and decode profiles; check compares every block and select graph; the TensorRT
    backend chains the blocks (host arrays after a prune point, device tensors in decode) as ONNX Runtime does."""
    manifest = Manifest.read(built_feather)
    for key, _ in manifest.blocks():
        assert [p["name"] for p in engine_meta.read_meta(built_feather, key).profiles] == ["prefill", "decode"]
    rows = check(built_feather, {name: photos[name] for name in ("chelsea", "portrait")})
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert {r.graph for r in rows} >= {"llm.1.decode", "select.image.2"}
    images, prompts = [photos["coffee"], photos["portrait"]], [PROMPT, "Describe it."]  # batch 2, left padding
    with Pipeline.load(export_dir("llava15", None, method="feather")) as reference:
        want = reference.generate(images, prompts, max_new_tokens=8, return_logits=True)
    for cuda_graphs in (False, True):
        with Pipeline.load(built_feather, backend="trt", cuda_graphs=cuda_graphs) as engines:
            for _ in range(2):  # the second query replays captured graphs
                got = engines.generate(images, prompts, max_new_tokens=8, return_logits=True)
                for a, b in zip(got, want):
                    assert [k.tolist() for k in a.kept_stages] == [k.tolist() for k in b.kept_stages]
                    worst = max(float(np.abs(x - y).max()) for x, y in zip(a.logits, b.logits))
                    assert worst < 1e-2, f"logits differ by {worst:.3g}"
                    assert a.token_ids == b.token_ids

"""The runner protocol and the splice step as the ONNX Runtime backend provides them, and the package's
public names (`from runtime import Pipeline`, as the README writes it)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from contract.errors import InputError
from runtime.backends.base import HostSplicer, Runner, check_feeds
from runtime.pipeline import Timings
from tests.helpers import PROMPTS, ROOT

KEEP = 32


def test_runtime_exports_the_pipeline_without_importing_a_backend():
    script = """
import sys
import runtime
before = sorted(m for m in sys.modules if m in ('runtime.pipeline', 'onnxruntime', 'tensorrt'))
from runtime import InputError, Pipeline, Result, Timings
import runtime.pipeline as pipeline
assert (Pipeline, Result, Timings) == (pipeline.Pipeline, pipeline.Result, pipeline.Timings)
assert {'Pipeline', 'Result', 'Timings', 'InputError'} <= set(dir(runtime))
print(before, 'onnxruntime' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False", out.stdout  # onnxruntime only once Pipeline.load asks for it


def test_unknown_name_is_an_attribute_error():
    import runtime

    with pytest.raises(AttributeError):
        runtime.Pipline  # noqa: B018


def test_ort_runners_are_runners_with_the_shared_checks(pipeline):
    pipe = pipeline(KEEP)
    assert isinstance(pipe.splicer, HostSplicer)
    for runner in pipe.runners.values():
        assert isinstance(runner, Runner)
    vision = pipe.runners["vision"]
    size = vision.spec.input("pixel_values").shape[2]
    with pytest.raises(InputError) as raised:
        vision.infer({"pixel_values": np.zeros((1, 3, size, size), np.float64)})
    assert str(raised.value) == (f"{vision.spec.file}: input 'pixel_values' has dtype float64, expected float32")
    with pytest.raises(InputError) as again:
        check_feeds(vision.spec, {"pixel_values": np.zeros((1, 3, size, size), np.float64)})
    assert str(again.value) == str(raised.value)


def test_encode_and_splice_on_the_host(pipeline, photos):
    """Each row: left padding, the text before the placeholder, the image's K tokens, the text after it;
    the visual tokens are the projector's output for the kept indices the vision graph returned."""
    pipe = pipeline(KEEP)
    ids = [pipe.prompt_ids(p) for p in PROMPTS[:2]]
    images = [photos["chelsea"], photos["coffee"]]
    visual, kept = pipe.encode(images, "image", Timings())
    pixels = np.concatenate([pipe.layouts["image"].tiles(image)[0] for image in images])
    vision = pipe.runners["vision"].infer({"pixel_values": pixels})
    projected = pipe.runners["projector"].infer(vision)["image_embeds"]  # [B, K, D]
    for i in range(len(images)):
        np.testing.assert_array_equal(kept[i], vision["keep_indices"][i:i + 1])
        np.testing.assert_array_equal(visual[i], projected[i])
    embeds, mask = pipe.splice(ids, visual)
    table, placeholder = pipe.generator.embeddings, pipe.manifest.modalities["image"].placeholder_id
    length = max(len(i) for i in ids) - 1 + KEEP
    assert embeds.shape == (2, length, table.shape[1]) and embeds.dtype == np.float32
    for row, (prompt, tokens) in enumerate(zip(ids, visual)):
        at = prompt.index(placeholder)
        want = np.concatenate([table[prompt[:at]], tokens, table[prompt[at + 1:]]])
        pad = length - len(want)
        np.testing.assert_array_equal(embeds[row, pad:], want)
        np.testing.assert_array_equal(embeds[row, :pad], np.broadcast_to(table[pipe.manifest.llm.pad_token_id], (pad, table.shape[1])))
        assert mask[row].tolist() == [0] * pad + [1] * len(want)


def test_close_releases_the_runners_and_the_embedding_table(tiny_export, photos):
    from runtime import Pipeline

    with Pipeline.load(tiny_export(32)) as pipe:
        assert pipe.generate(photos["chelsea"], "What is this?", max_new_tokens=2).token_ids
        embeddings = pipe.generator.embeddings
    assert all(runner.session is None for runner in pipe.runners.values())
    assert embeddings._fd == -1
    with pytest.raises(RuntimeError, match="not active"):
        pipe.generate(photos["chelsea"], "What is this?", max_new_tokens=2)


def test_deadline_never_relabels_an_answer_that_ended_for_its_own_reason(pipeline, photos):
    """A spent budget on the last allowed token is still 'length' (no further step would have started)."""
    result = pipeline(32).generate(photos["chelsea"], "What is this?", max_new_tokens=1, deadline_ms=1e-6)
    assert (len(result.token_ids), result.finish_reason) == (1, "length")
    result = pipeline(32).generate(photos["chelsea"], "What is this?", max_new_tokens=5, deadline_ms=1e-6)
    assert (len(result.token_ids), result.finish_reason) == (1, "deadline")

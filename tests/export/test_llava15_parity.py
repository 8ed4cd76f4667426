"""The exported LLaVA-1.5 graphs, run by the runtime, against Hugging Face transformers and against a
PyTorch reference of FasterVLM, on real photos.

Tolerances: logits at every generated step within LOGIT_ATOL of PyTorch (fp32 on both sides; observed
~1e-6), greedy tokens identical, kept index sets identical.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from export import reference
from tests.helpers import PROMPTS

LOGIT_ATOL = 1e-3
NEW_TOKENS = 20


def hf_inputs(processor, images, prompts):
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    return processor(images=list(images), text=texts, return_tensors="pt", padding=True)


def assert_same_generation(results, hf_tokens: torch.Tensor, hf_logits: tuple, eos: set[int]) -> None:
    for row, result in enumerate(results):
        expected = hf_tokens[row].tolist()
        if any(t in eos for t in expected):  # HF pads a finished row; the runtime stops it
            expected = expected[: next(i for i, t in enumerate(expected) if t in eos) + 1]
        assert result.token_ids == expected, f"row {row}: runtime {result.token_ids} != reference {expected}"
        worst = max(
            float(np.abs(ours - ref[row].numpy()).max()) for ours, ref in zip(result.logits, hf_logits)
        )
        print(f"row {row}: {len(expected)} tokens equal, worst logit difference {worst:.2e}")
        assert worst <= LOGIT_ATOL, f"row {row}: logits differ by {worst:.3e} > {LOGIT_ATOL}"


CASES = [
    (["astronaut"], PROMPTS[:1]),
    (["chelsea"], PROMPTS[1:2]),
    (["rocket"], PROMPTS[2:3]),
    (["coffee", "portrait"], [PROMPTS[2], PROMPTS[0]]),  # batch 2, prompts of different lengths
]


@pytest.mark.parametrize("names,prompts", CASES, ids=["+".join(c[0]) for c in CASES])
def test_unpruned_export_matches_hf_generate(names, prompts, photos, tiny, pipeline):
    model, processor = tiny
    pipe = pipeline(576)
    images = [photos[n] for n in names]
    inputs = hf_inputs(processor, images, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    hf_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert all(len(r.token_ids) == NEW_TOKENS for r in results), "pick prompts that do not stop early"
    assert_same_generation(results, hf_tokens, out.logits, set(pipe.manifest.llm.eos_token_ids))
    for r in results:
        np.testing.assert_array_equal(r.kept_indices, np.arange(576))


@pytest.mark.parametrize("keep", [1, 29, 32, 144])
def test_keep_indices_match_hf_eager_attention(keep, photos, tiny, pipeline):
    """The vision graph's top-k equals the selection from HF's own eager attention maps."""
    model, processor = tiny
    pixel_values = processor.image_processor(list(photos.values()), return_tensors="pt")["pixel_values"]
    _, expected = reference.hf_selection(model, pixel_values, keep)
    got = pipeline(keep).runners["vision"].infer({"pixel_values": pixel_values.numpy()})["keep_indices"]
    assert got.shape == (len(photos), keep)
    assert np.all(np.diff(got, axis=1) > 0), "indices must be sorted ascending"
    for row, name in enumerate(photos):
        assert got[row].tolist() == expected[row].tolist(), f"{name}: kept sets differ at K={keep}"


@pytest.mark.parametrize("keep", [1, 29, 32, 144])
def test_pruned_generation_matches_torch_reference(keep, photos, tiny, pipeline):
    """Runtime (runtime preprocessing included) == PyTorch FasterVLM reference on the HF model, batch 2."""
    model, processor = tiny
    images, prompts = [photos["chelsea"], photos["astronaut"]], [PROMPTS[0], PROMPTS[2]]
    inputs = hf_inputs(processor, images, prompts)
    out, indices = reference.generate(model, inputs, keep, NEW_TOKENS, output_logits=True,
                                      return_dict_in_generate=True)
    pipe = pipeline(keep)
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    for row, result in enumerate(results):
        assert result.kept_indices.tolist() == indices[row].tolist()
        assert result.prompt_tokens == int(inputs["attention_mask"][row].sum()) - 576 + keep
    assert_same_generation(results, out.sequences, out.logits, set(pipe.manifest.llm.eos_token_ids))


def test_opset23_export_matches_hf_generate(photos, tiny, tiny_checkpoint, tmp_path):
    """--opset 23 (fused Attention / RMSNormalization / RotaryEmbedding ops for ONNX Runtime), batch 2
    with left padding, pruned at K=32: same tokens as the PyTorch reference."""
    from export.api import Progress, run
    from export.spec import ExportOptions
    from runtime.pipeline import Pipeline

    model, processor = tiny
    out = run(ExportOptions("llava15", 32, model=str(tiny_checkpoint), out=tmp_path / "o23", opset=23),
              Progress(stream=io.StringIO()))
    images, prompts = [photos["rocket"], photos["coffee"]], [PROMPTS[1], PROMPTS[2]]
    inputs = hf_inputs(processor, images, prompts)
    ref, _ = reference.generate(model, inputs, 32, NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    results = Pipeline.load(out).generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert_same_generation(results, ref.sequences, ref.logits, {model.generation_config.eos_token_id})


def test_onnxruntime_target_matches_hf_generate(photos, tiny, export_dir, pipeline):
    """--target onnxruntime (GroupQueryAttention over KV buffers the graph writes in place), batch 2 with left
    padding, K=32: same tokens and logits as the PyTorch reference. A cached prompt prefix (what the perception
    loop uses; batch 2 runs row by row there) gives the standard export's logits. TensorRT refuses the export."""
    from contract.errors import ManifestError
    from runtime import Pipeline

    model, processor = tiny
    directory = export_dir("llava15", 32, target="onnxruntime")
    pipe = Pipeline.load(directory)
    assert (pipe.manifest.target, pipe.manifest.llm.kv_cache) == ("onnxruntime", "buffer")
    images, prompts = [photos["rocket"], photos["coffee"]], [PROMPTS[1], PROMPTS[2]]
    inputs = hf_inputs(processor, images, prompts)
    ref, _ = reference.generate(model, inputs, 32, NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert_same_generation(results, ref.sequences, ref.logits, {model.generation_config.eos_token_id})

    embeddings = pipe.generator.embeddings
    ids = np.random.default_rng(0).integers(0, len(embeddings), 12)
    rows = np.stack([embeddings[ids[5:]], embeddings[ids[5:]][::-1]])  # [2, 7, D] after a 5-token prefix
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0
    logits = {}
    for name, generator in (("standard", pipeline(32).generator), ("onnxruntime", pipe.generator)):
        state, step = generator.prefill(rows, mask, prefix=generator.compute_prefix(embeddings[ids[:5]][None]))
        logits[name] = [step]
        for _ in range(4):
            logits[name].append(generator.decode_one_token(state, logits[name][-1].argmax(-1)))
    np.testing.assert_allclose(np.stack(logits["onnxruntime"]), np.stack(logits["standard"]), atol=LOGIT_ATOL)
    with pytest.raises(ManifestError, match="--target onnxruntime"):
        Pipeline.load(directory, backend="trt")


def test_kv_buffers_that_grow_while_decoding_give_the_same_logits(photos, export_dir, monkeypatch):
    """--target onnxruntime: a KV buffer that fills up mid-decode is replaced by a larger one (the filled part
    copied) and the runner's views of the old one are dropped (its OrtValues and its I/O binding hold only the
    current buffers); the logits are those of a buffer that never grew."""
    from runtime import Pipeline
    from runtime.generation import KVCache

    pipe = Pipeline.load(export_dir("llava15", 32, target="onnxruntime"))
    (roomy,) = pipe.generate([photos["rocket"]], [PROMPTS[1]], max_new_tokens=6, return_logits=True)
    grown = []
    reserve = KVCache.reserve

    def spy(cache, new_tokens):
        current = [id(v) for v in cache.values.values()]  # after the last call: views of these buffers only
        (state,) = cache.handles.values() or [None]  # what the ONNX Runtime runner keeps between calls
        views = state.views if state else {}  # array id -> (the array, its OrtValue)
        assert sorted(views) == sorted(current) or not cache.handles
        bound = [state.names] if state else []  # what the I/O binding's names are bound to
        assert bound or not cache.handles
        assert all({id(v) for v in names.values()} <= {id(view) for _, view in views.values()} for names in bound)
        before = next(iter(cache.values.values())).shape[2]
        into = reserve(cache, new_tokens)
        if next(iter(cache.values.values())).shape[2] != before and cache.length:
            grown.append(before)
        return into

    monkeypatch.setattr(KVCache, "GRANULE", 1)
    monkeypatch.setattr(KVCache, "reserve", spy)
    (tight,) = pipe.generate([photos["rocket"]], [PROMPTS[1]], max_new_tokens=6, return_logits=True)
    assert grown, "the buffers never grew"
    assert tight.token_ids == roomy.token_ids
    np.testing.assert_allclose(np.stack(tight.logits), np.stack(roomy.logits), atol=1e-5)


def test_int8_llm_weights_with_the_onnxruntime_target(photos, export_dir):
    """--target onnxruntime --llm-weights int8: every linear layer of the LLM graph (the fused q/k/v, o, gate, up,
    down; lm_head) is one MatMulNBits with 8-bit weights in blocks of 32 at accuracy level 4; it answers."""
    import onnx

    from runtime import Pipeline

    directory = export_dir("llava15", 32, target="onnxruntime", llm_weights="int8")
    pipe = Pipeline.load(directory)
    assert pipe.manifest.llm.weights == "int8"
    model = onnx.load(str(directory / "llm.onnx"), load_external_data=False)
    linear = [{a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(linear) == 5 * pipe.manifest.llm.num_layers + 1
    assert all((a["bits"], a["block_size"], a["accuracy_level"]) == (8, 32, 4) for a in linear)
    assert not [n for n in model.graph.node if n.op_type == "MatMul"]
    float_pipe = Pipeline.load(export_dir("llava15", 32, target="onnxruntime"))
    (int8,), (fp32,) = (p.generate([photos["rocket"]], [PROMPTS[1]], max_new_tokens=4, return_logits=True)
                        for p in (pipe, float_pipe))
    print("int8 vs fp32 first-step logits:", np.abs(int8.logits[0] - fp32.logits[0]).max(), np.ptp(fp32.logits[0]))
    assert int8.token_ids == fp32.token_ids
    np.testing.assert_allclose(int8.logits[0], fp32.logits[0], atol=0.02 * np.ptp(fp32.logits[0]))


def test_int4_llm_weights(photos, export_dir, pipeline):
    """--llm-weights int4: every linear layer of the LLM graph but the lm_head reads HQQ int4 codes through a
    blocked DequantizeLinear plus its float zero-point branch ((x @ E) @ O, added), and the weights these
    rebuild are close to the float ones (the branch is what makes them close); the lm_head reads int8 per
    output channel; the vision and projector graphs are the float ones; it answers. (Quality is measured on
    real weights: tests/export/test_llm_real_weights.py.)"""
    import onnx
    from onnx import numpy_helper

    from runtime import Pipeline

    directory = export_dir("llava15", 32, llm_weights="int4")
    pipe = Pipeline.load(directory)
    assert pipe.manifest.llm.weights == "int4"
    model = onnx.load(str(directory / "llm.onnx"))
    float_model = onnx.load(str(export_dir("llava15", 32) / "llm.onnx"))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    types = {i.name: i.data_type for i in model.graph.initializer}
    float_weights = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    float_linear = {n.output[0]: float_weights[n.input[1]] for n in float_model.graph.node
                    if n.op_type == "MatMul" and n.input[1] in float_weights}
    produced = {out: node for node in model.graph.node for out in node.output}
    linear = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in produced
              and produced[n.input[1]].op_type == "DequantizeLinear"]
    config = pipe.manifest.llm
    assert len(linear) == 7 * config.num_layers + 1  # q, k, v, o, gate, up, down per layer; lm_head
    int4 = [n for n in linear if types[produced[n.input[1]].input[0]] == onnx.TensorProto.INT4]
    assert len(int4) == 7 * config.num_layers
    for node in int4:
        dequantize = produced[node.input[1]]
        assert {a.name: a.i for a in dequantize.attribute}["block_size"] == 32
        codes, scale = (initializers[name].astype(np.float32) for name in dequantize.input[:2])
        add = next(n for n in model.graph.node if n.op_type == "Add" and node.output[0] in n.input)
        offset = produced[next(name for name in add.input if name != node.output[0])]
        block_sum = produced[offset.input[0]]
        assert block_sum.input[0] == node.input[0]  # the same activations, summed per block of 32
        rebuilt = codes * np.repeat(scale, 32, axis=0)[:len(codes)] + initializers[block_sum.input[1]] @ \
            initializers[offset.input[1]]
        original = float_linear[add.output[0]]
        error, without_offset = np.abs(rebuilt - original).mean(), np.abs(rebuilt - original - (
            initializers[block_sum.input[1]] @ initializers[offset.input[1]])).mean()
        assert error < 0.15 * np.abs(original).mean() and error < without_offset / 2, (error, without_offset)
    (lm_head,) = [n for n in linear if n not in int4]
    dequantize = produced[lm_head.input[1]]
    assert types[dequantize.input[0]] == onnx.TensorProto.INT8
    assert initializers[dequantize.input[0]].shape == (config.hidden_size, config.vocab_size)
    float_dir = export_dir("llava15", 32)  # int4 codes, float scales and offsets (1/8 each), an int8 lm_head
    assert (directory / "llm.onnx.data").stat().st_size < (float_dir / "llm.onnx.data").stat().st_size / 3
    for name in ("vision.onnx.data", "projector.onnx.data"):
        assert (directory / name).read_bytes() == (float_dir / name).read_bytes()
    result = pipe.generate(photos["astronaut"], PROMPTS[0], max_new_tokens=8)
    assert len(result.token_ids) == 8

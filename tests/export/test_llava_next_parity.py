"""LLaVA-NeXT exports against Hugging Face transformers (released `hf` layout, unpruned) and against a
PyTorch reference of FasterVLM's anyres protocol (`fastervlm` layout), on real photos of several aspect
ratios. Tolerances as for LLaVA-1.5: logits within LOGIT_ATOL, tokens and kept sets identical, the LLM's
input sequence within EMBED_ATOL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import checkpoints, reference
from export.families import llava_next
from runtime.pipeline import Timings
from tests.export.test_llava15_parity import NEW_TOKENS, assert_same_generation, hf_inputs
from tests.helpers import PROMPTS

EMBED_ATOL = 1e-4
FASTERVLM_PINPOINTS = [list(llava_next.FASTERVLM_RESOLUTION)]


@pytest.fixture(scope="module")
def next_checkpoint():
    return checkpoints.for_family(llava_next, "tiny")


@pytest.fixture(scope="module")
def next_model(next_checkpoint):
    model, processor = llava_next.load(next_checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def next_pipeline(export_dir):
    from runtime.pipeline import Pipeline

    made = {}

    def get(keep: int):
        if keep not in made:
            made[keep] = Pipeline.load(export_dir("llava-next", keep))
        return made[keep]

    return get


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "portrait"])
def test_tiles_match_hf_processor(name, photos, next_model):
    """Runtime anyres tiling == LlavaNextImageProcessorPil, for the checkpoint's pinpoints and FasterVLM's."""
    from runtime import anyres
    from runtime.preprocess import load_image

    _, processor = next_model
    spec, pinpoints = llava_next.anyres_spec(processor.image_processor)
    for pins in (pinpoints, FASTERVLM_PINPOINTS):
        expected = processor.image_processor([photos[name]], image_grid_pinpoints=pins, return_tensors="np")
        ours = anyres.tiles(load_image(photos[name]), spec, pins, 336)
        ref = expected["pixel_values"][0][: len(ours)]  # HF pads the tile count of a batch
        assert ours.shape == ref.shape
        worst = float(np.abs(ours - ref).max())
        assert worst <= 1e-5, f"{name} {pins}: tiles differ by {worst}"


CASES = [(["astronaut"], PROMPTS[:1]), (["chelsea"], PROMPTS[1:2]), (["portrait", "chelsea"], [PROMPTS[2], PROMPTS[0]])]


@pytest.mark.parametrize("names,prompts", CASES, ids=["+".join(c[0]) for c in CASES])
def test_unpruned_hf_layout_matches_hf_generate(names, prompts, photos, next_model, next_pipeline):
    """K=576 defaults to the released layout (aspect-dependent grid, unpadding, newline tokens)."""
    model, processor = next_model
    pipe = next_pipeline(576)
    assert pipe.modality("image").layout.name == "anyres_hf"
    images = [photos[n] for n in names]
    inputs = hf_inputs(processor, images, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    for row, result in enumerate(results):
        assert result.prompt_tokens == int(inputs["attention_mask"][row].sum())
    assert_same_generation(results, out.sequences[:, inputs["input_ids"].shape[1]:], out.logits,
                           set(pipe.manifest.llm.eos_token_ids))


@pytest.mark.parametrize("keep", [1, 29, 144])
def test_fastervlm_layout_matches_reference(keep, photos, next_model, next_pipeline):
    """Per sub-image kept indices == HF eager attention selection; the LLM's input sequence == the PyTorch
    reference of FasterVLM's layout; greedy tokens == HF generate on that sequence."""
    model, processor = next_model
    pipe = next_pipeline(keep)
    assert pipe.modality("image").layout.name == "anyres_fastervlm"
    image, prompt = photos["portrait"], PROMPTS[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
    )
    inputs = processor(images=[image], text=[text], return_tensors="pt", image_grid_pinpoints=FASTERVLM_PINPOINTS)
    tokens, indices = llava_next.reference_tokens(model, inputs["pixel_values"][0], keep, (2, 2))
    assert tokens.shape == (5 * keep, model.config.text_config.hidden_size)
    expected_embeds = reference.replace_placeholder_run(model, inputs["input_ids"][0], tokens)

    visual, kept = pipe.encode([image], "image", Timings())
    assert kept[0].tolist() == indices.tolist(), "kept indices differ from HF eager attention"
    ids = pipe.prompt_ids(prompt)
    embeds, mask = pipe.splice([ids], visual)
    worst = float(np.abs(embeds[0] - expected_embeds.numpy()).max())
    print(f"K={keep}: LLM input sequence of {embeds.shape[1]} tokens, worst difference {worst:.2e}")
    assert embeds.shape[1] == expected_embeds.shape[0] == len(ids) - 1 + 5 * keep
    assert worst <= EMBED_ATOL

    with torch.no_grad():
        out = model.generate(inputs_embeds=expected_embeds[None], attention_mask=torch.ones(1, embeds.shape[1]),
                             max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    results = pipe.generate([image], [prompt], max_new_tokens=NEW_TOKENS, return_logits=True)
    assert results[0].kept_indices.shape == (5, keep)
    assert_same_generation(results, out.sequences, out.logits, set(pipe.manifest.llm.eos_token_ids))

"""FEATHER and FastV exports, run by the runtime (`from runtime import Pipeline`), against the test-side
PyTorch reference (tests/feather_reference.py: the HF model's own layers run by hand, sharing no code with
the exporter), on real photos.

For every case: the kept tokens of every stage are the reference's (exact sets), the greedy tokens are the
reference's for NEW_TOKENS tokens and the logits within LOGIT_ATOL, batch 1 and batch 2 with left padding;
the batch-2 rows keep unions of different sizes (so filler slots and re-padding are exercised). FasterVLM
with --positions original equals a reference that gathers position ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import Pipeline
from tests import feather_reference as ref
from tests.export.test_llava15_parity import LOGIT_ATOL
from tests.helpers import PROMPTS
from tests.test_feather_reference import embeds

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def pipes(export_dir):
    made = {}

    def get(method: str, **options) -> Pipeline:
        key = (method, tuple(sorted(options.items())))
        if key not in made:
            keep = options.pop("keep", None)
            if method != "fastervlm":  # the default: the same fixture key as the other tests' exports
                options["method"] = method
            made[key] = Pipeline.load(export_dir("llava15", keep, **options))
        return made[key]

    yield get
    for pipe in made.values():
        pipe.close()


def reference_run(model, pipe: Pipeline, inputs_embeds, mask, positions) -> ref.Generation:
    pruning = pipe.manifest.llm_pruning
    if pruning.method == "feather":
        return ref.feather(model, inputs_embeds, mask, positions, NEW_TOKENS, prune_layers=pruning.layers,
                           reduction=pruning.reduction, stride=pruning.stride)
    return ref.fastv(model, inputs_embeds, mask, positions, NEW_TOKENS, prune_layers=pruning.layers,
                     reduction=pruning.reduction)


def assert_same(results, gen: ref.Generation) -> None:
    for row, result in enumerate(results):
        for stage, (ours, theirs) in enumerate(zip(result.kept_stages, gen.stages), 1):
            assert ours.tolist() == theirs.kept[row], f"row {row} stage {stage}: kept tokens differ"
        assert len(result.kept_stages) == len(gen.stages)
        assert result.token_ids == gen.tokens[row].tolist(), f"row {row}: {result.token_ids} != {gen.tokens[row].tolist()}"
        worst = max(float(np.abs(ours - theirs[row].numpy()).max()) for ours, theirs in zip(result.logits, gen.logits))
        assert worst <= LOGIT_ATOL, f"row {row}: logits differ by {worst:.3e} > {LOGIT_ATOL}"
        print(f"row {row}: kept {[len(k) for k in result.kept_stages]}, {len(result.token_ids)} tokens equal, "
              f"worst logit difference {worst:.2e}")


CASES = [
    ("feather", ["astronaut"], PROMPTS[:1], "standard"),
    ("feather", ["chelsea", "portrait"], [PROMPTS[2], PROMPTS[0]], "standard"),  # batch 2, left padding, unions of 217 and 219
    ("fastv", ["coffee", "portrait"], [PROMPTS[2], PROMPTS[0]], "standard"),
    # every block's attention as GroupQueryAttention over its own KV buffers, written in place
    ("feather", ["chelsea", "portrait"], [PROMPTS[2], PROMPTS[0]], "onnxruntime"),
]


@pytest.mark.parametrize("method,names,prompts,target", CASES, ids=[f"{c[0]}-{'+'.join(c[1])}-{c[3]}" for c in CASES])
def test_export_matches_reference(method, names, prompts, target, tiny, photos, pipes):
    model, processor = tiny
    pipe = pipes(method, **({} if target == "standard" else {"target": target}))
    assert pipe.manifest.target == target
    images = [photos[n] for n in names]
    inputs_embeds, mask, positions, _ = embeds(model, processor, images, prompts)
    gen = reference_run(model, pipe, inputs_embeds, mask, positions)
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert_same(results, gen)
    for row, result in enumerate(results):
        assert result.prompt_tokens == int(mask[row].sum()), "prompt_tokens counts the unpruned prompt"
    if method == "feather" and len(names) == 2:
        # top-k and grid overlap, differently per row: each union is smaller than the stage's slots (top-k +
        # grid), so filler slots are masked, and the rows have different lengths after the gather
        sizes = [len(r.kept_stages[0]) for r in results]
        slots = pipe.manifest.graphs["select.image.1"].outputs[0].shape[1]
        assert slots == int(576 * (1 - 0.7)) + 64 == 236
        assert sizes[0] != sizes[1] and max(sizes) < slots, f"stage-1 unions {sizes} of {slots} slots"


def stitched_grid(stride: int, tile: int = 24, tiles: tuple[int, int] = (2, 2)) -> list[int]:
    """LLaVA-NeXT's fastervlm layout: the base image's 24x24 grid[::s, ::s], then every tile's, where the tiles'
    tokens sit in raster order over the stitched (48x48) grid after the base image's 576."""
    base = [r * tile + c for r in range(0, tile, stride) for c in range(0, tile, stride)]
    rows, cols = tiles[0] * tile, tiles[1] * tile
    return base + [tile * tile + y * cols + x for y in range(rows) for x in range(cols)
                   if (y % tile) % stride == 0 and (x % tile) % stride == 0]


@pytest.mark.parametrize("names,prompts", [(["rocket"], PROMPTS[1:2]), (["coffee", "portrait"], [PROMPTS[2], PROMPTS[0]])],
                         ids=["batch1", "batch2"])
def test_llava_next_feather_matches_reference(names, prompts, export_dir, photos, next_model):
    """LLaVA-NeXT (fastervlm layout: base image + 2x2 tiles, 2880 tokens): the window is the item's unpruned
    tokens in layout order, the grid is each sub-image's. The reference is fed the runtime's unpruned LLM
    input (its layout is checked against HF in tests/export/test_llava_next_parity.py)."""
    from runtime.pipeline import Timings

    pipe = next_model["pipe"]
    images = [photos[n] for n in names]
    ids = [pipe.prompt_ids(p) for p in prompts]
    visual, _ = pipe.encode(images, "image", Timings())
    inputs_embeds, mask = pipe.splice(ids, visual)
    count = visual[0].shape[0]
    placeholder = pipe.modality("image").placeholder_id
    at = [mask.shape[1] - (len(i) - 1 + count) + i.index(placeholder) for i in ids]
    positions = torch.tensor(np.stack([a + np.arange(count) for a in at]))
    pruning = pipe.manifest.llm_pruning
    assert count == 5 * 576 and pruning.layers == (1, 2)
    gen = ref.generate(next_model["model"], torch.from_numpy(inputs_embeds), torch.from_numpy(mask), positions,
                       NEW_TOKENS, prune_layers=pruning.layers, reduction=pruning.reduction,
                       grid=stitched_grid(pruning.stride), rope_scores=False)
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert_same(results, gen)


@pytest.fixture(scope="module")
def next_model(export_dir):
    from export import checkpoints
    from export.families import llava_next

    model, _ = llava_next.load(checkpoints.for_family(llava_next, "tiny"))
    with Pipeline.load(export_dir("llava-next", None, method="feather")) as pipe:
        yield {"model": model, "pipe": pipe}


def test_fastervlm_original_positions_match_gathered_reference(tiny, photos, pipes):
    """--positions original: the kept tokens' position ids are their unpruned ones, the text after the image
    continues from the unpruned length, decoding too; equal to HF's LLM fed gathered position ids."""
    model, processor = tiny
    keep = 32
    pipe = pipes("fastervlm", keep=keep, positions="original")
    packed = pipes("fastervlm", keep=keep)
    images, prompts = [photos["coffee"], photos["portrait"]], [PROMPTS[2], PROMPTS[0]]
    inputs_embeds, mask, image_at, _ = embeds(model, processor, images, prompts)
    results = pipe.generate(images, prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    # reference: the unpruned sequence's positions, gathered at the text and the kept image tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep_rows = []
    for row, result in enumerate(results):
        kept_at = image_at[row, torch.as_tensor(result.kept_indices)]
        dropped = set(image_at[row].tolist()) - set(kept_at.tolist())
        keep_rows.append([i for i in range(mask.shape[1]) if i not in dropped])
    length = max(len(k) for k in keep_rows)
    hidden = inputs_embeds.new_zeros(2, length, inputs_embeds.shape[-1])
    sub_mask = mask.new_zeros(2, length)
    sub_pos = positions.new_zeros(2, length)
    for row, index in enumerate(keep_rows):
        index = torch.tensor(index)
        hidden[row, length - len(index):] = inputs_embeds[row, index]
        sub_mask[row, length - len(index):] = mask[row, index]
        sub_pos[row, length - len(index):] = positions[row, index]
    llm = model.model.language_model
    tokens, logits = [], []
    with torch.no_grad():
        out = llm(inputs_embeds=hidden, attention_mask=sub_mask, position_ids=sub_pos, use_cache=True)
        cache, step_logits = out.past_key_values, model.lm_head(out.last_hidden_state[:, -1])
        next_pos = positions[:, -1] + 1
        for _ in range(NEW_TOKENS):
            logits.append(step_logits)
            tokens.append(step_logits.argmax(-1))
            sub_mask = torch.cat([sub_mask, torch.ones(2, 1, dtype=sub_mask.dtype)], 1)
            out = llm(inputs_embeds=llm.embed_tokens(tokens[-1])[:, None], attention_mask=sub_mask,
                      position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            cache, step_logits, next_pos = out.past_key_values, model.lm_head(out.last_hidden_state[:, -1]), next_pos + 1
    reference = torch.stack(tokens, 1)
    for row, result in enumerate(results):
        assert result.token_ids == reference[row].tolist()
        worst = max(float(np.abs(ours - theirs[row].numpy()).max()) for ours, theirs in zip(result.logits, logits))
        assert worst <= LOGIT_ATOL, f"row {row}: logits differ by {worst:.3e}"
    # and it is a different model input than packed positions: the logits move
    other = packed.generate(images, prompts, max_new_tokens=1, return_logits=True)
    assert any(float(np.abs(a.logits[0] - b.logits[0]).max()) > 1e-4 for a, b in zip(results, other))


def test_calibration_refuses_the_llm_blocks(export_dir, photos, tmp_path):
    """`python -m calibration --graphs llm` on an in-LLM pruned export: one line, exit 2, nothing written."""
    from PIL import Image

    from tests.helpers import assert_refused, leftovers, run_main, snapshot

    directory = export_dir("llava15", None, method="feather")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(photos["coffee"]).save(images / "coffee.png")
    before = snapshot(directory)
    run = run_main("calibration", directory, "--images", images, "--graphs", "llm", "--precision", "int8", cwd=tmp_path)
    assert_refused(run, "--graphs llm", "inside the LLM", "vision,projector")
    assert snapshot(directory) == before and leftovers(directory) == []

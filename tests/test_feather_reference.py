"""The test-side PyTorch reference of FEATHER and FastV (tests/feather_reference.py), on real photos.

(a) Unpruned, the hand-run decoder (masks, positions, per-layer caches, decode) gives HF `generate`'s greedy
    tokens and logits (within LOGIT_ATOL) for 20 tokens, batch 1 and batch 2 with left padding; a prune
    point that keeps every token (R = 0) changes nothing either (the gather and the per-block caches).
(b) FEATHER at prune layers scaled to a 3-layer LLM: counts are the formulas, the stage-1 set is exactly
    top-k U grid (|U| = |topk| + |grid| - overlap), the top-k really are the highest scores, sets are
    ascending, the grid is always kept, each block's cache holds its own number of tokens.
(c) FastV keeps int(n * 0.25).
(d) Overlap of top-k and grid: the union is smaller than its upper bound k + |grid|.
"""

from __future__ import annotations

import pytest
import torch

from tests import feather_reference as ref
from tests.export.test_llava15_parity import hf_inputs
from tests.helpers import PROMPTS

LOGIT_ATOL = 1e-3
NEW_TOKENS = 20
N = 576  # image tokens of LLaVA-1.5 (24 x 24)
GRID = ref.uniform_grid(24, 24, ref.FEATHER_STRIDE)


def embeds(model, processor, images, prompts):
    """(inputs_embeds [B, S, D], attention_mask [B, S], image_positions [B, n], HF processor inputs)."""
    inputs = hf_inputs(processor, images, prompts)
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        features = tower.hidden_states[model.config.vision_feature_layer][:, 1:]  # [B, 576, C]
        image = model.model.multi_modal_projector(features)  # [B, 576, D]
        ids = inputs["input_ids"]
        is_image = ids == model.config.image_token_id
        inputs_embeds = model.get_input_embeddings()(ids).masked_scatter(is_image.unsqueeze(-1), image)
    positions = torch.stack([row.nonzero()[:, 0] for row in is_image])  # [B, 576]
    assert positions.shape[1] == N and bool((positions.diff(dim=1) == 1).all()), "one contiguous image run"
    return inputs_embeds, inputs["attention_mask"], positions, inputs


@pytest.fixture(scope="module")
def deep(tiny):
    """The tiny checkpoint: its 3-layer LLM fits FEATHER's two prune points (scaled to layers 1 and 2)."""
    model = tiny[0]
    assert model.config.text_config.num_hidden_layers == 3
    return model


@pytest.fixture(scope="module")
def batch2(tiny, photos):
    model, processor = tiny
    return embeds(model, processor, [photos["coffee"], photos["portrait"]], [PROMPTS[2], PROMPTS[0]])


def assert_matches_hf(gen: ref.Generation, out, prompt_length: int) -> None:
    hf_tokens = out.sequences[:, prompt_length:]
    assert gen.tokens.tolist() == hf_tokens.tolist(), f"reference {gen.tokens.tolist()} != HF {hf_tokens.tolist()}"
    worst = max(float((ours - theirs).abs().max()) for ours, theirs in zip(gen.logits, out.logits))
    print(f"{gen.tokens.shape[1]} tokens equal, worst logit difference {worst:.2e}")
    assert len(gen.logits) == len(out.logits) == NEW_TOKENS
    assert worst <= LOGIT_ATOL, f"logits differ by {worst:.3e} > {LOGIT_ATOL}"


@pytest.mark.parametrize("rows", [1, 2])
def test_unpruned_reference_matches_hf_generate(rows, tiny, photos, batch2):
    model, processor = tiny
    if rows == 1:
        inputs_embeds, mask, positions, inputs = embeds(model, processor, [photos["astronaut"]], PROMPTS[:1])
    else:
        inputs_embeds, mask, positions, inputs = batch2
        assert int(mask.sum(1).min()) < mask.shape[1], "batch 2 must be left-padded"
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert not (generated == model.generation_config.eos_token_id).any(), "pick prompts that do not stop early"
    gen = ref.generate(model, inputs_embeds, mask, positions, NEW_TOKENS)
    assert_matches_hf(gen, out, inputs["input_ids"].shape[1])
    assert gen.stages == [] and gen.cache_lengths[0] == mask.sum(1).tolist()

    # a prune point that keeps everything (R = 0): gathers, re-padding and per-block caches change nothing
    kept_all = ref.generate(model, inputs_embeds, mask, positions, NEW_TOKENS, prune_layers=(1,), reduction=0.0,
                            rope_scores=True)
    assert kept_all.stages[0].kept == [list(range(N))] * rows
    assert_matches_hf(kept_all, out, inputs["input_ids"].shape[1])


def check_topk(stage: ref.Stage, row: int, count: int) -> None:
    """The top-k set has `count` members and they really are the highest scores of the alive tokens."""
    topk, score, alive = stage.topk[row], stage.scores[row], stage.alive[row]
    assert len(topk) == count and topk == sorted(topk)
    chosen = torch.tensor([i in set(topk) for i in alive])
    if 0 < count < len(alive):
        assert float(score[chosen].min()) > float(score[~chosen].max()), "top-k is not the highest scores"


def test_feather_stages_follow_the_formulas(deep, batch2):
    inputs_embeds, mask, positions, _ = batch2
    layers = ref.scale_prune_layers(ref.FEATHER_LAYERS, deep.config.text_config.num_hidden_layers)
    assert layers == (1, 2)
    gen = ref.feather(deep, inputs_embeds, mask, positions, NEW_TOKENS, prune_layers=layers)
    first, second = gen.stages
    assert (first.layer, second.layer) == layers
    k1 = int(N * (1 - 0.7))
    assert k1 == 172 and len(GRID) == 64
    for row in range(2):
        check_topk(first, row, k1)
        union = set(first.topk[row]) | set(GRID)
        overlap = len(set(first.topk[row]) & set(GRID))
        assert first.kept[row] == sorted(union), "stage 1 is exactly top-k U grid, ascending"
        assert len(first.kept[row]) == k1 + len(GRID) - overlap
        assert set(GRID) <= set(first.kept[row]), "the grid is always kept at stage 1"
        n1 = len(first.kept[row])
        assert second.alive[row] == first.kept[row]
        check_topk(second, row, int(n1 * (1 - 0.7) ** 2))
        assert second.kept[row] == second.topk[row], "no grid at stage 2"
        assert set(second.kept[row]) <= set(first.kept[row])
        text = int(mask[row].sum()) - N
        lengths = [c[row] for c in gen.cache_lengths]
        assert lengths == [text + N, text + n1, text + len(second.kept[row])], lengths
        print(f"row {row}: |topk| {k1} + |grid| 64 - overlap {overlap} = n1 {n1}; n2 {len(second.kept[row])}; "
              f"cache lengths per layer {lengths}")
    assert gen.tokens.shape == (2, NEW_TOKENS)


def test_fastv_keeps_a_quarter(tiny, batch2):
    model = tiny[0]
    inputs_embeds, mask, positions, _ = batch2
    layers = ref.scale_prune_layers(ref.FASTV_LAYERS, model.config.text_config.num_hidden_layers)
    gen = ref.fastv(model, inputs_embeds, mask, positions, NEW_TOKENS, prune_layers=layers)
    (stage,) = gen.stages
    for row in range(2):
        check_topk(stage, row, N // 4)
        assert stage.kept[row] == stage.topk[row] and len(stage.kept[row]) == int(N * 0.25) == 144
        assert gen.cache_lengths[1][row] == int(mask[row].sum()) - N + 144
    # FastV's score has RoPE, FEATHER's has not: the rankings differ on the same layer
    plain = ref.generate(model, inputs_embeds, mask, positions, 1, prune_layers=layers, reduction=0.75)
    assert plain.stages[0].kept != stage.kept


def test_union_smaller_than_its_bound_when_topk_and_grid_overlap(deep, batch2):
    """R = 0.1: top-k holds 518 of 576 tokens, so at least 518 + 64 - 576 = 6 grid tokens are in it."""
    inputs_embeds, mask, positions, _ = batch2
    gen = ref.feather(deep, inputs_embeds, mask, positions, 2, prune_layers=(1, 2), reduction=0.1)
    first = gen.stages[0]
    for row in range(2):
        k = int(N * 0.9)
        check_topk(first, row, k)
        overlap = len(set(first.topk[row]) & set(GRID))
        assert overlap >= k + len(GRID) - N
        assert len(first.kept[row]) == k + len(GRID) - overlap < k + len(GRID)
        n1 = len(first.kept[row])
        assert len(gen.stages[1].kept[row]) == int(n1 * 0.9**2)

"""PyTorch references the exported graphs are checked against (tests) and timed against (benchmarks).

`hf_selection` computes FasterVLM's selection the way the reference code does: the vision tower run with
eager attention and `output_attentions=True`, the [CLS] row of the feature layer's attention map.
`generate` is the whole pruned pipeline in PyTorch on the HF model: image features from HF, that
selection, the HF projector, and HF `generate` on the shortened sequence. A family whose layout differs
keeps its own reference beside its graphs (`llava_next.reference_tokens`, `video_llava.reference_tokens`).
"""

from __future__ import annotations

import contextlib

import torch

from contract import names
from export import pruning


@contextlib.contextmanager
def eager_attention(module):
    """Temporarily switch a HF model (or sub-model) to eager attention, which can return attention maps."""
    previous = module.config._attn_implementation
    module.set_attn_implementation("eager")
    try:
        yield module
    finally:
        module.set_attn_implementation(previous)


def hf_selection(model, pixel_values: torch.Tensor, keep: int, tower=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image_features [B, N, C] from hidden_states[feature_layer] without [CLS], keep_indices [B, K]).
    tower: the CLIP tower to run (default: the model's only one, `vision_tower`; Video-LLaVA has two)."""
    tower = model.model.vision_tower if tower is None else tower
    layer = model.config.vision_feature_layer
    with torch.no_grad(), eager_attention(tower):
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    features = out.hidden_states[layer][:, 1:]
    # hidden_states[h] is the output of encoder layer h-1, so attentions[h-1] belongs to it; for a negative
    # h that is attentions[h] (both tuples end at the last layer).
    attention_index = layer if layer < 0 else layer - 1
    return features, pruning.reference_selection(out.attentions[attention_index], keep)


def pruned_inputs(model, inputs: dict, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF processor outputs (one image per prompt, N image tokens each) -> inputs_embeds with K image tokens
    per prompt, the matching attention mask, and the kept indices [B, K]."""
    features, indices = hf_selection(model, inputs[names.PIXEL_VALUES], keep)
    with torch.no_grad():
        image_embeds = model.model.multi_modal_projector(pruning.gather_tokens(features, indices))  # [B, K, D]
        embed = model.get_input_embeddings()
        image_id = model.config.image_token_id
        rows, masks = [], []
        for ids, mask, image in zip(inputs["input_ids"], inputs[names.ATTENTION_MASK], image_embeds):
            is_image = ids == image_id
            first = int(is_image.nonzero()[0])
            keep_text = ~is_image
            before, after = ids[:first][keep_text[:first]], ids[first:][keep_text[first:]]
            rows.append(torch.cat([embed(before), image, embed(after)]))
            masks.append(torch.cat([mask[:first][keep_text[:first]], torch.ones(len(image), dtype=mask.dtype),
                                    mask[first:][keep_text[first:]]]))
    return torch.stack(rows), torch.stack(masks), indices


def generate(model, inputs: dict, keep: int, max_new_tokens: int, **kwargs):
    """Greedy HF generate on the FasterVLM-pruned sequence. Returns (HF generate output, kept indices)."""
    inputs_embeds, attention_mask, indices = pruned_inputs(model, inputs, keep)
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, **kwargs,
        )
    return out, indices


def replace_placeholder_run(model, input_ids: torch.Tensor, tokens: torch.Tensor,
                            token_id: int | None = None) -> torch.Tensor:
    """inputs_embeds of one prompt whose run of image placeholder tokens (however many the HF processor
    wrote) is replaced by `tokens` [T, D]. input_ids [S] without padding. token_id: another placeholder
    (Video-LLaVA's video token); default the image token."""
    embed = model.get_input_embeddings()
    is_image = input_ids == (model.config.image_token_id if token_id is None else token_id)
    first = int(is_image.nonzero()[0])
    after = first + int(is_image.sum())
    with torch.no_grad():
        return torch.cat([embed(input_ids[:first]), tokens, embed(input_ids[after:])])

"""LLaVA-NeXT (HF `LlavaNextForConditionalGeneration`, "anyres") with FasterVLM applied per sub-image.

The graphs are LLaVA-1.5's (vision + top-k, gather + projector, LLM): the vision graph runs the sub-images
(base image and tiles) as one batch, the projector gathers per sub-image, and the runtime orders the
tokens by layout (runtime/layout.py). Two layouts:

    fastervlm  (default when K < 576) the protocol of the paper's numbers: the image fitted into a fixed
               672x672 (aspect kept, zero-padded, as the HF processor does for that one resolution), cut
               into 2x2 tiles of 336 plus the base image: 5 x 576 = 2880 tokens; the same K kept in each of
               the 5 sub-images (K=29 gives 145); no unpadding, no newline tokens; base tokens first, then
               the tiles' tokens in raster order over the stitched 48x48 grid.
    hf         (default when K = 576, unpruned only) the released model's own processing: the tile grid
               chosen from the image's aspect ratio among the checkpoint's pinpoints, padding removed,
               a learned newline embedding after every row, exactly as transformers does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from contract import names
from contract.errors import ExportError
from contract.layouts import AnyresFasterVLMLayout, AnyresHFLayout
from contract.manifest import MethodSpec, ModalitySpec
from export import reference, synthetic
from export.families import llava15
from export.processor import anyres_spec

NAME = "llava-next"
DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"
FASTERVLM_RESOLUTION = (672, 672)  # the authors' fixed input: a 2x2 grid of 336 tiles
LAYOUTS = {"fastervlm": AnyresFasterVLMLayout, "hf": AnyresHFLayout}  # --layout name -> contract.layouts
KEEP_HELP = "1..576 per sub-image (5 sub-images), the paper uses 29"
LAYOUT_HELP = {
    "fastervlm": "fixed 672x672, 2x2 tiles + base, K per sub-image, the paper's protocol; default when pruning",
    "hf": "the released model's anyres layout with unpadding and newline tokens; unpruned only, default at K=576",
}
NEWLINE_FILE = "image_newline.npy"


def default_layout(keep: int, num_patches: int) -> str:
    return "hf" if keep == num_patches else "fastervlm"


def _build_synthetic(directory: Path, *, vision: dict, text: dict, seed: int) -> None:
    """A LLaVA-NeXT-shaped checkpoint with random weights (CLIP 336/14, feature layer -2, Llama with
    grouped-query attention, the default anyres pinpoints), SmolLM2's real tokenizer."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = synthetic.smollm2_tokenizer([llava15.IMAGE_TOKEN])
    tokenizer.padding_side = "left"
    vision_config, text_config = synthetic.tower_configs(tokenizer, vision, text, image_size=336, max_positions=8192)
    config = LlavaNextConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(llava15.IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    synthetic.save_random_model(LlavaNextForConditionalGeneration, config, tokenizer, directory, seed,
                                lambda model: [model.model.vision_tower], llm=text)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", chat_template=llava15.CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)


SYNTHETIC = synthetic.builders(_build_synthetic, seed=1)


def read_config(path: Path):
    config = llava15.read_config(path, model_type="llava_next")
    if getattr(config, "image_grid_pinpoints", None) is None:
        raise ExportError(f"{path} has no image_grid_pinpoints: not an anyres LLaVA-NeXT checkpoint")
    return config


def load(path: Path):
    from transformers import LlavaNextForConditionalGeneration

    return llava15.load(path, LlavaNextForConditionalGeneration)


method_spec = llava15.method_spec
decoder = llava15.decoder
graphs = llava15.graphs  # same three graphs: the vision graph takes the sub-images as its batch


def modalities(model, processor, method: MethodSpec, directory: Path, layout: str) -> dict[str, ModalitySpec]:
    tile_spec, pinpoints = anyres_spec(processor.image_processor)
    tile = model.config.vision_config.image_size
    if tile_spec["do_center_crop"] and tile_spec["crop_size"] != {"height": tile, "width": tile}:
        raise ExportError(f"the processor crops tiles to {tile_spec['crop_size']}, the vision tower takes {tile}")
    if layout == "fastervlm":
        spec = AnyresFasterVLMLayout(resolution=FASTERVLM_RESOLUTION, tile=tile)
    else:
        np.save(directory / NEWLINE_FILE, model.model.image_newline.detach().float().numpy())
        spec = AnyresHFLayout(grid_pinpoints=tuple(tuple(p) for p in pinpoints), tile=tile, newline=NEWLINE_FILE)
    token = processor.image_token
    return {
        "image": ModalitySpec(
            placeholder=token,
            placeholder_id=int(processor.tokenizer.convert_tokens_to_ids(token)),
            content_type="image",
            vision=names.VISION,
            projector=names.PROJECTOR,
            preprocess=tile_spec,
            layout=spec,
        )
    }


# --- PyTorch reference (tests and benchmarks compare the graphs with it) ---------------------------

def reference_tokens(model, pixel_values: torch.Tensor, keep: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FasterVLM's LLaVA-NeXT layout for one image, the reference way: project every token, merge the tiles
    spatially (no unpadding, no newline), then mask with each sub-image's top-k.

    pixel_values [1 + rows*cols, 3, H, W] (base image first, tiles in raster order) -> (tokens [(1 + rows*cols)*K, D]:
    base tokens in raster order, then the tiles' tokens in raster order over the stitched grid; kept indices
    [1 + rows*cols, K]).
    """
    rows, cols = grid
    features, indices = reference.hf_selection(model, pixel_values, keep)  # [S, N, C], [S, K]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features)  # [S, N, D]
    side = int(features.shape[1] ** 0.5)
    d = projected.shape[-1]
    mask = torch.zeros(features.shape[:2], dtype=torch.bool)  # [S, N]
    mask.scatter_(1, indices, True)
    stitched = projected[1:].view(rows, cols, side, side, d).permute(0, 2, 1, 3, 4).reshape(-1, d)
    stitched_mask = mask[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(-1)
    return torch.cat([projected[0][mask[0]], stitched[stitched_mask]]), indices


# --- benchmark reference (scripts/bench.py times it beside the exported graphs) ------------------------

BENCH_KEEPS = (576, 29)  # scripts/bench.py: the unpruned 2880-token baseline and the paper's 95 %
BENCH_LAYOUT = "fastervlm"
BENCH_PAPER_TTFT = "the FasterVLM paper reports 313 -> 78 ms CUDA time (4.0x) for LLaVA-NeXT-7B at K=29 on an A100 (POPE)"


def bench_reference(model, processor, text: str, image, keep: int):
    """HF LLaVA-NeXT with FasterVLM's protocol: 672x672 -> base + 2x2 tiles, eager vision tower over the
    5 sub-images, project all tokens, spatial merge, mask with each sub-image's top-k."""
    import time

    t0 = time.perf_counter()
    inputs = processor(images=[image], text=[text], return_tensors="pt",
                       image_grid_pinpoints=[list(FASTERVLM_RESOLUTION)])
    t1 = time.perf_counter()
    tokens, _ = reference_tokens(model, inputs[names.PIXEL_VALUES][0], keep, (2, 2))
    t2 = time.perf_counter()
    embeds = reference.replace_placeholder_run(model, inputs["input_ids"][0], tokens)[None]
    # Selection and projection are timed together ("vision"): the reference projects before masking.
    return {"pre": t1 - t0, "vision": t2 - t1, "projector": 0.0}, embeds, torch.ones(embeds.shape[:2], dtype=torch.long)

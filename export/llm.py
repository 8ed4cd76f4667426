"""The LLM graph: one decoder forward over input embeddings with the KV cache in and out.

One graph serves prefill (past length 0) and decode (1 new token): the runtime feeds the text
embeddings with the image embeddings spliced in, so the graph never sees token ids. It runs the
checkpoint's own decoder layers (any HF decoder whose layers take `position_embeddings` and call
`past_key_values.update`: Llama, Mistral, Qwen2, ... including grouped-query attention), so the
numbers are the checkpoint's; only the mask and the cache bookkeeping are ours.

    inputs_embeds [B, S, D] --> layers 0..L-1 (RoPE from position_ids, mask from attention_mask)
    attention_mask [B, P+S]        |  each layer: K/V = concat(past K/V [B, Hkv, P, Dh], new)
    position_ids [B, S]            v
    past_key_values.i.{key,value} -> norm -> last position -> lm_head -> logits [B, V]
                                     present.i.{key,value} [B, Hkv, P+S, Dh]
"""

from __future__ import annotations

import torch
from torch import nn

from contract import names
from contract.errors import ExportError
from contract.manifest import (
    BATCH,
    PAST,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQUENCE,
    TOTAL,
    GraphSpec,
    TensorSpec,
)
from export.graph import GraphExport, Tolerance


class _GraphCache:
    """Stands in for transformers' Cache inside the traced forward: `update` appends the new keys and
    values to the layer's past and records the result as that layer's present output."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key], dim=2)  # [B, Hkv, P+S, Dh]
        value = torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


def additive_causal_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, P+S] padding mask (1 = token, 0 = pad) -> [B, 1, S, P+S] additive mask.

    Query i (absolute position P+i) sees key j when j <= P+i and key j is not padding. Rows of padding
    queries may be fully masked; they get the dtype's minimum everywhere (finite, so no NaN) and are never
    read by real tokens.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    query_pos = torch.arange(seq_len, device=attention_mask.device).unsqueeze(1) + past  # [S, 1]
    key_pos = torch.arange(total, device=attention_mask.device).unsqueeze(0)  # [1, P+S]
    allowed = (key_pos <= query_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [B, S, P+S]
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg).unsqueeze(1)  # [B, 1, S, P+S]


class DecoderGraph(nn.Module):
    """Wraps an HF decoder (`decoder`: embed_tokens, layers, norm, rotary_emb) and its `lm_head`."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module):
        super().__init__()
        for part in ("layers", "norm", "rotary_emb"):
            if not hasattr(decoder, part):
                raise ExportError(f"language model {type(decoder).__name__} has no {part!r}: not a supported HF decoder")
        layer_types = getattr(decoder.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ExportError(
                f"language model {type(decoder).__name__} uses layer types {sorted(set(layer_types))}; "
                "only full-attention decoders are supported"
            )
        self.decoder = decoder
        self.lm_head = lm_head
        self.num_layers = len(decoder.layers)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.num_layers)]
        cache = _GraphCache(past)
        hidden = inputs_embeds  # [B, S, D]
        mask = additive_causal_mask(attention_mask, hidden.shape[1], hidden.dtype)  # [B, 1, S, P+S]
        position_embeddings = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.decoder.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        hidden = self.decoder.norm(hidden[:, -1])  # [B, D]: only the next-token logits are needed
        logits = self.lm_head(hidden).float()  # [B, V]
        present = [t for pair in cache.present for t in pair]
        return (logits, *present)


def llm_spec(decoder: nn.Module, lm_head: nn.Module, file: str, dtype: str = "float32") -> tuple[GraphSpec, dict]:
    """Tensor specs of the LLM graph and its dims (for the manifest's `llm` section)."""
    cfg = decoder.config
    num_heads = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    inputs = [
        TensorSpec(names.INPUTS_EMBEDS, dtype, (BATCH, SEQUENCE, cfg.hidden_size)),
        TensorSpec(names.ATTENTION_MASK, "int64", (BATCH, TOTAL)),
        TensorSpec(names.POSITION_IDS, "int64", (BATCH, SEQUENCE)),
    ]
    outputs = [TensorSpec(names.LOGITS, "float32", (BATCH, lm_head.out_features))]
    for i in range(len(decoder.layers)):
        for pattern in (PAST_KEY, PAST_VALUE):
            inputs.append(TensorSpec(pattern.format(i), dtype, (BATCH, num_kv, PAST, head_dim)))
        for pattern in (PRESENT_KEY, PRESENT_VALUE):
            outputs.append(TensorSpec(pattern.format(i), dtype, (BATCH, num_kv, TOTAL, head_dim)))
    dims = dict(
        num_layers=len(decoder.layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=lm_head.out_features,
    )
    return GraphSpec(file=file, inputs=tuple(inputs), outputs=tuple(outputs)), dims


def example_inputs(spec: GraphSpec, batch: int = 2, seq: int = 3, past: int = 4, seed: int = 0) -> dict:
    """Random feeds for tracing and validation: sizes > 1 so torch.export keeps every axis dynamic."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {BATCH: batch, SEQUENCE: seq, PAST: past, TOTAL: past + seq}
    feeds = {}
    for t in spec.inputs:
        shape = [sizes.get(d, d) for d in t.shape]
        if t.name == names.ATTENTION_MASK:
            mask = torch.ones(shape, dtype=torch.int64)
            mask[0, : min(2, past + seq - 1)] = 0  # left padding in the first row
            feeds[t.name] = mask
        elif t.name == names.POSITION_IDS:
            feeds[t.name] = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        else:
            feeds[t.name] = torch.randn(shape, generator=gen, dtype=getattr(torch, t.dtype))
    return feeds


def graph_export(decoder: nn.Module, lm_head: nn.Module, spec: GraphSpec) -> GraphExport:
    tolerances = {t.name: Tolerance(1e-4, 1e-4) for t in spec.outputs}
    tolerances[names.LOGITS] = Tolerance(1e-3, 1e-3)
    return GraphExport(
        names.LLM, DecoderGraph(decoder, lm_head).eval(), spec,
        lambda seed: example_inputs(spec, *EXAMPLE_SIZES[seed % len(EXAMPLE_SIZES)], seed=seed), tolerances,
        compared=_cache_positions_in_use,
    )


def _cache_positions_in_use(feeds: dict, name: str):
    """KV-cache entries at left-padding positions are never attended to; compare only the others."""
    if not name.startswith("present."):
        return None
    return feeds[names.ATTENTION_MASK].numpy().astype(bool)[:, None, :, None]  # [B, 1, P+S, 1]


# (batch, new tokens, past tokens) per example seed: the tracing case, then a prefill and a decode step.
EXAMPLE_SIZES = [(2, 3, 4), (2, 5, 0), (2, 1, 6)]

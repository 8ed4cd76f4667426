"""The LLM graph: one decoder forward over input embeddings with the KV cache in and out.

One graph serves prefill (past length 0) and decode (1 new token): the runtime feeds the text
embeddings with the image embeddings spliced in, so the graph never sees token ids. It runs the
checkpoint's own decoder layers (any HF decoder whose layers take `position_embeddings` and call
`past_key_values.update`: Llama, Mistral, Qwen2, ... including grouped-query attention), so the
numbers are the checkpoint's; the mask, the cache bookkeeping and the attention product are ours
(`grouped_attention`: KV heads read in place; below opset 23, where SDPA would not become ONNX Attention).
For FEATHER / FastV the decoder is exported as blocks of layers between the prune points (`block_exports`),
each with its own layers' cache; a block before a prune point outputs its hidden states and the last
token's attention logits for the next layer instead of the logits.

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

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past  # layer index -> (key, value)
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


GROUPED_ATTENTION = "prunevlm_grouped"  # the attention the graph is traced with (registered below)
FUSED_ATTENTION_OPSET = 23  # from here the checkpoint's SDPA exports as ONNX's Attention operator: kept


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention with grouped-query heads read in place: query [B, H, S, Dh], key / value [B, Hkv, T, Dh]
    (the whole cache), additive mask [B, 1, S, T] -> ([B, S, H, Dh], None), transformers' attention interface.

    HF's eager and SDPA paths expand K and V to H heads (repeat_kv): in the exported graph that is a copy of
    every layer's whole cache, H/Hkv times, at every decode step. Here the G = H/Hkv query heads of a KV head
    are stacked as rows of one matmul against that head's keys, so no copy of the cache is made. Same math
    (softmax in fp32, as SDPA's reference); the parity tests compare the graphs with HF's own attention."""
    batch, heads, seq, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads  # query head h = kv * group + g reads KV head kv
    scale = dim**-0.5 if scaling is None else scaling
    q = (query * scale).reshape(batch, kv_heads, group * seq, dim)  # rows (g, s) of each KV head; scaled while small
    scores = torch.matmul(q, key.transpose(-1, -2)).reshape(batch, heads, seq, total)  # a view: same memory order
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :total]  # [B, 1, S, T]
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype).reshape(batch, kv_heads, group * seq, total)
    out = torch.matmul(probs, value)  # [B, Hkv, G*S, Dh]
    return out.reshape(batch, heads, seq, dim).transpose(1, 2), None  # [B, S, H, Dh]


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)


class _TracedAttention:
    """Within the graph's forward, the decoder's attention layers use `grouped_attention`; the model's own
    setting is put back afterwards (the caller's model, e.g. a reference run next to the export, is unchanged)."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        self.saved = self.config._attn_implementation
        self.config._attn_implementation = GROUPED_ATTENTION

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved


class DecoderGraph(nn.Module):
    """Wraps an HF decoder (`decoder`: embed_tokens, layers, norm, rotary_emb) and its `lm_head`.

    layers: the block of decoder layers this graph runs (default: all). The block that ends the decoder
    outputs the next-token logits; any other block outputs its hidden states and, for the prune point after
    it, `prune_logits`: the last token's attention logits at the block's last layer (METHODS.md, FEATHER:
    that layer's input_layernorm, q_proj and k_proj on the hidden states entering it; RoPE on q and k only
    when `rope`, FastV's score), per query head against its KV head, over every position of the sequence.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, layers: range | None = None, rope: bool = False,
                 grouped: bool = True):
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
        _register_grouped_attention()
        self.decoder = decoder
        self.lm_head = lm_head
        self.num_layers = len(decoder.layers)
        self.layers = range(self.num_layers) if layers is None else layers
        self.last = self.layers.stop == self.num_layers
        self.rope = rope
        self.grouped = grouped  # trace with grouped_attention (else the checkpoint's own attention)
        cfg = decoder.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads

    def prune_logits(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """[B, S, D] hidden states entering `layer` -> [B, H, S] float32: q(last token) . k(each token) / sqrt(d)."""
        attn = layer.self_attn
        batch, seq, _ = hidden.shape
        x = layer.input_layernorm(hidden)  # [B, S, D]
        q = attn.q_proj(x[:, -1:]).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, 1, Dh]
        k = attn.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        if self.rope:
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [B, 1, S, Dh]
            q = q * cos[:, :, -1:] + _rotate_half(q) * sin[:, :, -1:]
            k = k * cos + _rotate_half(k) * sin
        group = self.heads // self.kv_heads  # query head h reads KV head h // group: no expanded keys
        q = q.reshape(batch, self.kv_heads, group, self.head_dim)  # [B, Hkv, G, Dh]
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # [B, Hkv, G, S]
        return logits.reshape(batch, self.heads, seq).float()

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        past = {index: (past_flat[2 * j], past_flat[2 * j + 1]) for j, index in enumerate(self.layers)}
        cache = _GraphCache(past)
        hidden = inputs_embeds  # [B, S, D]
        mask = additive_causal_mask(attention_mask, hidden.shape[1], hidden.dtype)  # [B, 1, S, P+S]
        position_embeddings = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        if not self.grouped:
            return self._layers(hidden, mask, position_ids, position_embeddings, cache)
        with _TracedAttention(self.decoder.config):
            return self._layers(hidden, mask, position_ids, position_embeddings, cache)

    def _layers(self, hidden, mask, position_ids, position_embeddings, cache):
        prune_logits = None
        for index in self.layers:
            layer = self.decoder.layers[index]
            if not self.last and index == self.layers.stop - 1:
                prune_logits = self.prune_logits(layer, hidden, position_embeddings)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        present = [t for index in self.layers for t in cache.present[index]]
        if not self.last:
            return (hidden, prune_logits, *present)
        hidden = self.decoder.norm(hidden[:, -1])  # [B, D]: only the next-token logits are needed
        logits = self.lm_head(hidden).float()  # [B, V]
        return (logits, *present)


def llm_spec(decoder: nn.Module, lm_head: nn.Module, file: str, dtype: str = "float32",
             layers: range | None = None) -> tuple[GraphSpec, dict]:
    """Tensor specs of the LLM graph (or of the block running `layers`) and the LLM's dims (the manifest's
    `llm` section)."""
    cfg = decoder.config
    num_heads = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    layers = range(len(decoder.layers)) if layers is None else layers
    inputs = [
        TensorSpec(names.INPUTS_EMBEDS, dtype, (BATCH, SEQUENCE, cfg.hidden_size)),
        TensorSpec(names.ATTENTION_MASK, "int64", (BATCH, TOTAL)),
        TensorSpec(names.POSITION_IDS, "int64", (BATCH, SEQUENCE)),
    ]
    if layers.stop == len(decoder.layers):
        outputs = [TensorSpec(names.LOGITS, "float32", (BATCH, lm_head.out_features))]
    else:
        outputs = [TensorSpec(names.HIDDEN_STATES, dtype, (BATCH, SEQUENCE, cfg.hidden_size)),
                   TensorSpec(names.PRUNE_LOGITS, "float32", (BATCH, num_heads, SEQUENCE))]
    for i in layers:
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


def graph_export(decoder: nn.Module, lm_head: nn.Module, spec: GraphSpec, name: str = names.LLM,
                 layers: range | None = None, rope: bool = False) -> GraphExport:
    tolerances = {t.name: Tolerance(1e-4, 1e-4) for t in spec.outputs}
    tolerances[names.LOGITS] = Tolerance(1e-3, 1e-3)
    tolerances[names.PRUNE_LOGITS] = Tolerance(1e-3, 1e-3)
    return GraphExport(
        name, DecoderGraph(decoder, lm_head, layers, rope).eval(), spec,
        lambda seed: example_inputs(spec, *EXAMPLE_SIZES[seed % len(EXAMPLE_SIZES)], seed=seed), tolerances,
        compared=_cache_positions_in_use,
    )


def block_exports(decoder: nn.Module, lm_head: nn.Module, bounds: tuple[int, ...], rope: bool) -> list[GraphExport]:
    """The decoder as blocks [bounds[i], bounds[i+1]), graphs names.llm_block(i): one copy of every weight."""
    exports = []
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        layers = range(start, stop)
        spec, _ = llm_spec(decoder, lm_head, f"{names.llm_block(i)}.onnx", layers=layers)
        exports.append(graph_export(decoder, lm_head, spec, names.llm_block(i), layers, rope))
    return exports


def _cache_positions_in_use(feeds: dict, name: str):
    """KV-cache entries at left-padding positions are never attended to; compare only the others."""
    valid = feeds[names.ATTENTION_MASK].numpy().astype(bool)  # [B, P+S]
    if name.startswith("present."):
        return valid[:, None, :, None]  # [B, 1, P+S, 1]
    if name == names.HIDDEN_STATES:  # padding queries' rows are fully masked: never read
        return valid[:, -feeds[names.INPUTS_EMBEDS].shape[1]:, None]  # [B, S, 1]
    return None


# (batch, new tokens, past tokens) per example seed: the tracing case, then a prefill and a decode step.
EXAMPLE_SIZES = [(2, 3, 4), (2, 5, 0), (2, 1, 6)]

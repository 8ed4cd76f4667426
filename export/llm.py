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

`kv_cache="buffer"` (the `--target onnxruntime` export): each layer's attention is one MatMul for q, k and v,
ONNX Runtime's RotaryEmbedding on q and k (from position_ids, so pruned sequences keep their positions) and its
GroupQueryAttention over a preallocated [B, Hkv, capacity, Dh] buffer that the runtime binds as both the past
input and the present output, so the new keys and values are written in place at positions P..P+S-1 and
nothing is copied per step; the padding mask reaches it as an additive bias (left padding, as everywhere).
Llama-style attention only (q/k/v/o projections, rotate-half RoPE that depends on the position alone).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from contract import names
from contract.errors import ExportError
from contract.manifest import (
    BATCH,
    CAPACITY,
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


class _BufferCache:
    """`kv_cache="buffer"`: what `_fused_attention` (which gets this object as the `kv_buffer` argument) needs
    besides the layer: the buffers, GroupQueryAttention's length inputs, the positions and rotary tables, the
    fused q/k/v projections; it records each layer's present buffers."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, graph: "DecoderGraph"):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        batch, total = attention_mask.shape
        # GroupQueryAttention's length inputs: every row holds P+S positions (left padding included, masked)
        self.seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32)
        self.total = torch.full((), total, dtype=torch.int32)
        self.position_ids = position_ids
        self.graph = graph  # the fused q/k/v projections, rotary tables and head counts


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """query [B, H, S, Dh], key / value [B, Hkv, T, Dh], additive bias [B, 1, S, T] -> [B, S, H, Dh]: the G =
    H/Hkv query heads of a KV head stacked as rows of one matmul against that head's keys (no copy of K, V)."""
    batch, heads, seq, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads  # query head h = kv * group + g reads KV head kv
    q = (query * scale).reshape(batch, kv_heads, group * seq, dim)  # rows (g, s) of each KV head; scaled while small
    scores = torch.matmul(q, key.transpose(-1, -2)).reshape(batch, heads, seq, total)  # a view: same memory order
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype).reshape(batch, kv_heads, group * seq, total)
    out = torch.matmul(probs, value)  # [B, Hkv, G*S, Dh]
    return out.reshape(batch, heads, seq, dim).transpose(1, 2)


@torch.library.custom_op("prunevlm::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          attention_bias: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's com.microsoft GroupQueryAttention (the export translates it to that operator; this is
    its reference for tracing and validation), in the form the LLM graph uses it: query [B, S, H*Dh], key /
    value [B, S, Hkv*Dh] (RoPE applied), past buffers [B, Hkv, C, Dh] holding positions 0..P-1, total P+S <= C,
    attention_bias [B, 1, S, P+S] (causal and padding) -> output [B, S, H*Dh], the buffers with the new keys
    and values at P..P+S-1 (positions past P+S as they were)."""
    batch, seq, _ = query.shape
    dim = past_key.shape[-1]
    total = int(total_sequence_length)
    past = total - seq
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, past:total] = key.view(batch, seq, kv_num_heads, dim).transpose(1, 2)
    present_value[:, :, past:total] = value.view(batch, seq, kv_num_heads, dim).transpose(1, 2)
    q = query.view(batch, seq, num_heads, dim).transpose(1, 2)
    out = _attend(q, present_key[:, :, :total], present_value[:, :, :total], attention_bias, scale)
    return out.reshape(batch, seq, num_heads * dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, attention_bias, num_heads,
      kv_num_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _group_query_attention_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                attention_bias, num_heads: int, kv_num_heads: int, scale: float):
    """The exporter's translation of `group_query_attention`: one com.microsoft GroupQueryAttention node
    (no rotary: RoPE was applied from position_ids, which may skip positions after pruning)."""
    import onnxscript

    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
    return gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, None, None, None,
               attention_bias, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, _num_outputs=3)


def _gqa_schema():
    """The part of ONNX Runtime's GroupQueryAttention schema the translation uses (onnx ships no schemas of
    ONNX Runtime's com.microsoft domain; onnxscript needs one to emit the node)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [param("query", "T"), param("key", "T", param_option=optional), param("value", "T", param_option=optional),
              param("past_key", "T", param_option=optional), param("past_value", "T", param_option=optional),
              param("seqlens_k", "M"), param("total_sequence_length", "M"),
              param("cos_cache", "T", param_option=optional), param("sin_cache", "T", param_option=optional),
              param("position_ids", "tensor(int64)", param_option=optional),
              param("attention_bias", "T", param_option=optional)]
    outputs = [param("output", "T"), param("present_key", "T"), param("present_value", "T")]
    attr = OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, ""), attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                    attr("scale", OpSchema.AttrType.FLOAT, "")])


@torch.library.custom_op("prunevlm::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """ONNX Runtime's com.microsoft RotaryEmbedding (non-interleaved: HF's rotate_half), its reference: x [B, S,
    heads * Dh], position_ids [B, S] (any positions: FEATHER's and FastV's skip some), cos / sin tables [positions,
    Dh / 2] -> x rotated, same shape."""
    batch, seq, _ = x.shape
    x = x.view(batch, seq, num_heads, -1)
    half = x.shape[-1] // 2
    cos, sin = cos_cache[position_ids].unsqueeze(2), sin_cache[position_ids].unsqueeze(2)  # [B, S, 1, Dh/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).reshape(batch, seq, -1)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


def _rotary_embedding_onnx(x, position_ids, cos_cache, sin_cache, num_heads: int):
    import onnxscript

    rotary = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "RotaryEmbedding", _rotary_schema())
    return rotary(x, position_ids, cos_cache, sin_cache, num_heads=num_heads, interleaved=0)


def _rotary_schema():
    """ONNX Runtime's RotaryEmbedding schema, the part the translation uses."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        "RotaryEmbedding", "com.microsoft", 1,
        inputs=[param("input", "T"), param("position_ids", "M"), param("cos_cache", "T"), param("sin_cache", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int64)"], "")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, ""), attr("interleaved", OpSchema.AttrType.INT, "")])


ONNX_TRANSLATIONS = {torch.ops.prunevlm.group_query_attention.default: _group_query_attention_onnx,
                     torch.ops.prunevlm.rotary_embedding.default: _rotary_embedding_onnx}


def _fused_attention(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                     kv_buffer: _BufferCache | None = None, **kwargs):
    """A Llama-style attention layer's forward as the `--target onnxruntime` graph runs it (the layer is `self`):
    one MatMul for q, k and v (`DecoderGraph.qkv`), RotaryEmbedding on q and k from position_ids,
    GroupQueryAttention over the layer's buffers (mask as additive bias), o_proj. The same math as the layer's
    own forward, in the ~6 operators ONNX Runtime runs fastest instead of ~30."""
    graph = kv_buffer.graph
    heads, kv_heads, dim = graph.heads, graph.kv_heads, graph.head_dim
    q, k, v = graph.qkv[str(self.layer_idx)](hidden_states).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q = rotary_embedding(q, kv_buffer.position_ids, graph.rotary_cos, graph.rotary_sin, heads)
    k = rotary_embedding(k, kv_buffer.position_ids, graph.rotary_cos, graph.rotary_sin, kv_heads)
    past_key, past_value = kv_buffer.past[self.layer_idx]
    out, present_key, present_value = group_query_attention(
        q, k, v, past_key, past_value, kv_buffer.seqlens_k, kv_buffer.total, attention_mask, heads, kv_heads,
        float(getattr(self, "scaling", dim**-0.5)))
    kv_buffer.present[self.layer_idx] = (present_key, present_value)
    return self.o_proj(out), None


class _PatchedForward:
    """While tracing, `modules` run `forward` (a function of the module) instead of their own; put back after."""

    def __init__(self, modules: list[nn.Module], forward):
        self.modules, self.forward = modules, forward

    def __enter__(self):
        for module in self.modules:
            module.forward = self.forward.__get__(module)

    def __exit__(self, *exc):
        for module in self.modules:
            del module.forward


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
    every layer's whole cache, H/Hkv times, at every decode step. `_attend` stacks the query heads of a KV head
    instead. Same math (softmax in fp32, as SDPA's reference); the parity tests compare the graphs with HF's
    own attention."""
    total = key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    bias = None if attention_mask is None else attention_mask[:, :, :, :total]
    return _attend(query, key, value, bias, scale), None


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)


class _TracedAttention:
    """Within the graph's forward, the decoder's attention layers use `grouped_attention`; the model's own
    setting is put back afterwards (the caller's model, e.g. a reference run next to the export, is unchanged)."""

    def __init__(self, config, name: str = GROUPED_ATTENTION):
        self.config = config
        self.name = name

    def __enter__(self):
        self.saved = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved


def _rms_norm_by_division(self, hidden: torch.Tensor) -> torch.Tensor:
    """HF's Llama-style RMSNorm, weight * x / sqrt(mean(x^2) + eps) in fp32, written with a division: the
    pattern ONNX Runtime fuses into one SimplifiedLayerNormalization. HF's x * rsqrt(...) exports as Sqrt +
    Reciprocal + Mul, which it does not fuse: six operators per norm, two norms per layer, at every decode step.
    (ONNX Runtime 1.31 does not go on to fold the residual Add before it into SkipSimplifiedLayerNormalization:
    its profile of SmolLM2 shows 61 SimplifiedLayerNormalization and 61 Add per step.)"""
    dtype = hidden.dtype
    hidden = hidden.float()
    hidden = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * hidden.to(dtype)


def _dividing_rms_norm(decoder: nn.Module) -> _PatchedForward:
    """The decoder's Llama-style RMSNorms (a `weight` and a `variance_epsilon`, the formula of Llama, Mistral,
    Qwen2, Vicuna) run `_rms_norm_by_division` while tracing."""
    norms = [m for m in decoder.modules() if hasattr(m, "variance_epsilon") and
             isinstance(getattr(m, "weight", None), torch.Tensor) and type(m).__name__.endswith("RMSNorm")]
    return _PatchedForward(norms, _rms_norm_by_division)


def _fused_qkv(attn: nn.Module) -> nn.Linear:
    """One Linear computing q, k and v of a Llama-style attention layer (their weights and biases stacked):
    what `--target onnxruntime` traces; the layer's own projections are left as they are."""
    parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    extra = [name for name in ("q_norm", "k_norm") if hasattr(attn, name)]
    if not all(isinstance(part, nn.Linear) for part in parts) or extra:
        found = f"has {' and '.join(extra)}" if extra else "lacks q_proj/k_proj/v_proj/o_proj Linear layers"
        raise ExportError(f"--target onnxruntime: attention {type(attn).__name__} {found}; it supports Llama-style "
                          "attention (Llama, Vicuna, Mistral, Qwen2): export with --target standard")
    q, k, v = parts[:3]
    fused = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features, bias=q.bias is not None,
                      dtype=q.weight.dtype, device=q.weight.device)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is not None:
            fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    return fused.requires_grad_(False)


POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn", "proportional")  # rotary a function of the position


def _rotary_tables(decoder: nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's rotary embedding for positions 0..positions-1 as RotaryEmbedding's tables: cos, sin
    [positions, Dh / 2], from the checkpoint's own `rotary_emb` (its scaling included)."""
    rotary = decoder.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in POSITION_ONLY_ROPE:
        raise ExportError(f"--target onnxruntime: rope type {rope_type!r} depends on the sequence length, not a fixed "
                          f"table; supported: {', '.join(POSITION_ONLY_ROPE)}; export with --target standard")
    weight = decoder.layers[0].self_attn.o_proj.weight
    with torch.no_grad():
        cos, sin = rotary(weight.new_zeros(1), torch.arange(positions).unsqueeze(0))  # [1, positions, Dh]
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
        raise ExportError("--target onnxruntime: the decoder's rotary embedding is not rotate-half over the whole "
                          "head (partial or interleaved rotary); export with --target standard")
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


class DecoderGraph(nn.Module):
    """Wraps an HF decoder (`decoder`: embed_tokens, layers, norm, rotary_emb) and its `lm_head`.

    layers: the block of decoder layers this graph runs (default: all). The block that ends the decoder
    outputs the next-token logits; any other block outputs its hidden states and, for the prune point after
    it, `prune_logits`: the last token's attention logits at the block's last layer (METHODS.md, FEATHER:
    that layer's input_layernorm, q_proj and k_proj on the hidden states entering it; RoPE on q and k only
    when `rope`, FastV's score), per query head against its KV head, over every position of the sequence.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, layers: range | None = None, rope: bool = False,
                 grouped: bool = True, kv_cache: str = "concat", max_positions: int | None = None):
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
        self.kv_cache = kv_cache  # "buffer": GroupQueryAttention over buffers written in place (the manifest's)
        self.max_positions = max_positions
        cfg = decoder.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        if kv_cache == "buffer":
            self.qkv = nn.ModuleDict({str(i): _fused_qkv(decoder.layers[i].self_attn) for i in self.layers})
            cos, sin = _rotary_tables(decoder, max(max_positions or 0, cfg.max_position_embeddings))
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def single_layer(self) -> "DecoderGraph | None":
        """This graph with only the block's last layer (what `repeat_layer` copies for the others; the last one
        because a block's prune_logits read it), or None when the block has one layer or its layers are not
        alike."""
        layers = self.decoder.layers
        signature = lambda i: (type(layers[i]), [(n, p.shape, p.dtype) for n, p in layers[i].named_parameters()])  # noqa: E731
        if len(self.layers) < 2 or any(signature(i) != signature(self.layers.stop - 1) for i in self.layers):
            return None  # one layer, or layers that differ in class or parameter shapes: traced whole
        last = range(self.layers.stop - 1, self.layers.stop)
        return DecoderGraph(self.decoder, self.lm_head, last, self.rope, self.grouped, self.kv_cache,
                            self.max_positions).eval()

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
        hidden = inputs_embeds  # [B, S, D]
        mask = additive_causal_mask(attention_mask, hidden.shape[1], hidden.dtype)  # [B, 1, S, P+S]
        position_embeddings = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        if self.kv_cache == "buffer":
            cache = _BufferCache(past, attention_mask, position_ids, self)
            attentions = [self.decoder.layers[i].self_attn for i in self.layers]
            with _PatchedForward(attentions, _fused_attention), _dividing_rms_norm(self.decoder):
                return self._layers(hidden, mask, position_ids, position_embeddings, cache, kv_buffer=cache)
        cache = _GraphCache(past)
        if not self.grouped:  # opset 23: the exporter's own RMSNormalization
            return self._layers(hidden, mask, position_ids, position_embeddings, cache)
        with _TracedAttention(self.decoder.config), _dividing_rms_norm(self.decoder):
            return self._layers(hidden, mask, position_ids, position_embeddings, cache)

    def _layers(self, hidden, mask, position_ids, position_embeddings, cache, **attention):
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
                **attention,
            )
        present = [t for index in self.layers for t in cache.present[index]]
        if not self.last:
            return (hidden, prune_logits, *present)
        hidden = self.decoder.norm(hidden[:, -1:])  # [B, 1, D]: only the next-token logits are needed
        logits = self.lm_head(hidden)[:, 0].float()  # [B, V] (a MatMul, not a Gemm: --llm-weights int4 reads it)
        return (logits, *present)


class NotRepeatable(ExportError):
    """The one-layer trace cannot be copied into the whole decoder (`repeat_layer`): trace it whole."""


def repeat_layer(model, graph: DecoderGraph, spec: GraphSpec) -> None:
    """The exported graph of `graph.single_layer()` (an onnx_ir Model, before any optimization) -> the graph of
    `graph`, in place: the traced layer's nodes copied once per earlier layer of the block, in order, each copy
    reading the previous one's hidden states, its own past inputs and its own layer's weights, and writing its
    own present outputs; inputs and outputs then in the order of `graph`'s `spec`.

    Why: torch.export traces every decoder layer again (~3-5 s a layer here, most of a 7B model's export) though
    all are the same code. Sound because the layers are one class with the same config and parameter shapes
    (`single_layer` checks) and the layer index only picks the layer's cache entry, which the copy renames; the
    export's validation then compares the whole graph with `graph` itself. Nodes of the layer are those the
    exporter scoped under its module call (`pkg.torch.onnx.name_scopes`); a block's prune_logits call the last
    layer's submodules directly and are not copied. Raises NotRepeatable when the traced layer is not the
    self-contained piece this expects (the caller then traces the whole graph).
    """
    import ast

    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    last = graph.layers.stop - 1
    g = model.graph
    scope = f"decoder.layers.{last}"
    body = [n for n in g if scope in ast.literal_eval(n.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in body for a in n.attributes.values()):
        raise NotRepeatable(f"{scope} exported with subgraphs")
    inside = {id(n) for n in body}
    inputs = {v.name: v for v in g.inputs}
    hidden_in = inputs[names.INPUTS_EMBEDS]
    past = {pattern: inputs[pattern.format(last)] for pattern in (PAST_KEY, PAST_VALUE)}
    outputs = {v.name: v for v in g.outputs}
    present = {pattern: outputs[pattern.format(last)] for pattern in (PRESENT_KEY, PRESENT_VALUE)}
    escaping = [v for n in body if n.op_type != "Constant" for v in n.outputs  # constants: the exporter shares them
                if v.is_graph_output() or any(id(user) not in inside for user, _ in v.uses())]
    hidden_out = [v for v in escaping if v not in present.values()]
    if len(hidden_out) != 1:
        raise NotRepeatable(f"{scope}: {len(hidden_out)} values leave the layer besides its cache, expected 1")
    parameters = {**dict(graph.named_parameters()), **dict(graph.named_buffers())}
    prefixes = (f"decoder.layers.{last}.", f"qkv.{last}.")

    def renamed(name: str, index: int) -> str | None:
        """The name of layer `index`'s counterpart of the traced layer's weight `name` (None: shared)."""
        for prefix in prefixes:
            if name.startswith(prefix):
                return prefix.replace(f".{last}.", f".{index}.") + name[len(prefix):]
        return None

    weights = {id(v): v for n in body for v in n.inputs  # the traced layer's own weights
               if v is not None and v.is_initializer() and renamed(v.name, last) is not None}
    earlier = range(graph.layers.start, last)
    if any(renamed(v.name, i) not in parameters for v in weights.values() for i in earlier):
        raise NotRepeatable(f"{scope} reads an initializer that is not one of its module's weights")
    new_inputs, new_outputs, copies = {}, {}, []
    hidden = hidden_in
    for index in earlier:
        mapping = {id(hidden_in): hidden}
        for pattern, value in past.items():
            new_inputs[pattern.format(index)] = mapping[id(value)] = ir.Value(
                name=pattern.format(index), type=value.type, shape=value.shape)
        for key, value in weights.items():
            name = renamed(value.name, index)
            mapping[key] = ir.Value(name=name, type=value.type, shape=value.shape,
                                    const_value=TorchTensor(parameters[name], name=name))
            g.register_initializer(mapping[key])
        for node in body:
            copy = ir.Node(node.domain, node.op_type, [None if v is None else mapping.get(id(v), v) for v in node.inputs],
                           attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                           num_outputs=len(node.outputs), version=node.version, name=f"{node.name}.layer{index}",
                           metadata_props=dict(node.metadata_props))
            for old, value in zip(node.outputs, copy.outputs):
                value.name = f"{old.name}.layer{index}"
                value.type, value.shape = old.type, old.shape
                mapping[id(old)] = value
            copies.append(copy)
        for pattern, value in present.items():
            new_outputs[pattern.format(index)] = mapping[id(value)]
            mapping[id(value)].name = pattern.format(index)
        hidden = mapping[id(hidden_out[0])]
    # The traced layer and everything after it (epilogue, prune_logits) read the last copy's hidden states;
    # the first copy and what computes the layers' shared inputs (sizes, mask, rotary) read the graph input.
    upstream, stack = set(), [v for n in body for v in n.inputs if v is not None]
    while stack:
        producer = stack.pop().producer()
        if producer is not None and id(producer) not in upstream and id(producer) not in inside:
            upstream.add(id(producer))
            stack.extend(v for v in producer.inputs if v is not None)
    upstream.update(id(copy) for copy in copies)
    for user, position in list(hidden_in.uses()):
        if id(user) not in upstream:
            user.replace_input_with(position, hidden)
    g.insert_before(body[0], copies)
    all_inputs, all_outputs = {**inputs, **new_inputs}, {**outputs, **new_outputs}
    g.inputs.clear()
    g.inputs.extend(all_inputs[t.name] for t in spec.inputs)
    g.outputs.clear()
    g.outputs.extend(all_outputs[t.name] for t in spec.outputs)
    g.sort()


def llm_spec(decoder: nn.Module, lm_head: nn.Module, file: str, dtype: str = "float32",
             layers: range | None = None, kv_cache: str = "concat") -> tuple[GraphSpec, dict]:
    """Tensor specs of the LLM graph (or of the block running `layers`) and the LLM's dims (the manifest's
    `llm` section)."""
    past_axis, present_axis = (CAPACITY, CAPACITY) if kv_cache == "buffer" else (PAST, TOTAL)
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
            inputs.append(TensorSpec(pattern.format(i), dtype, (BATCH, num_kv, past_axis, head_dim)))
        for pattern in (PRESENT_KEY, PRESENT_VALUE):
            outputs.append(TensorSpec(pattern.format(i), dtype, (BATCH, num_kv, present_axis, head_dim)))
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
    sizes = {BATCH: batch, SEQUENCE: seq, PAST: past, TOTAL: past + seq, CAPACITY: past + seq + 3}
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
                 layers: range | None = None, rope: bool = False, kv_cache: str = "concat",
                 max_positions: int | None = None) -> GraphExport:
    """max_positions: the positions the rotary tables of a `kv_cache="buffer"` graph cover (at least the
    checkpoint's max_position_embeddings)."""
    tolerances = {t.name: Tolerance(1e-4, 1e-4) for t in spec.outputs}
    tolerances[names.LOGITS] = Tolerance(1e-3, 1e-3)
    tolerances[names.PRUNE_LOGITS] = Tolerance(1e-3, 1e-3)
    return GraphExport(
        name, DecoderGraph(decoder, lm_head, layers, rope, kv_cache=kv_cache, max_positions=max_positions).eval(), spec,
        lambda seed: example_inputs(spec, *EXAMPLE_SIZES[seed % len(EXAMPLE_SIZES)], seed=seed), tolerances,
        compared=_cache_positions_in_use,
    )


def block_exports(decoder: nn.Module, lm_head: nn.Module, bounds: tuple[int, ...], rope: bool,
                  kv_cache: str = "concat", max_positions: int | None = None) -> list[GraphExport]:
    """The decoder as blocks [bounds[i], bounds[i+1]), graphs names.llm_block(i): one copy of every weight."""
    exports = []
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        layers = range(start, stop)
        spec, _ = llm_spec(decoder, lm_head, f"{names.llm_block(i)}.onnx", layers=layers, kv_cache=kv_cache)
        exports.append(graph_export(decoder, lm_head, spec, names.llm_block(i), layers, rope, kv_cache,
                                    max_positions))
    return exports


def _cache_positions_in_use(feeds: dict, name: str):
    """KV-cache entries at left-padding positions are never attended to; compare only the others."""
    valid = feeds[names.ATTENTION_MASK].numpy().astype(bool)  # [B, P+S]
    if name.startswith("present."):  # a KV buffer ([B, Hkv, capacity, Dh]): positions past P+S are not written
        capacity = next(v.shape[2] for k, v in feeds.items() if k.startswith("past_key_values."))
        valid = np.pad(valid, ((0, 0), (0, max(0, capacity - valid.shape[1]))))
        return valid[:, None, :, None]  # [B, 1, P+S, 1]
    if name == names.HIDDEN_STATES:  # padding queries' rows are fully masked: never read
        return valid[:, -feeds[names.INPUTS_EMBEDS].shape[1]:, None]  # [B, S, 1]
    return None


# (batch, new tokens, past tokens) per example seed: the tracing case, then a prefill and a decode step.
EXAMPLE_SIZES = [(2, 3, 4), (2, 5, 0), (2, 1, 6)]

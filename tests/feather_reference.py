"""PyTorch reference of FEATHER and FastV (in-LLM visual-token pruning), written from the HF model alone.

Test-side code: it shares nothing with `export/` (the graphs it checks must not be able to agree with it by
construction). It runs the decoder layers of an HF `LlavaForConditionalGeneration` by hand, from the
layers' own modules (input_layernorm, q/k/v/o_proj, post_attention_layernorm, mlp, the decoder's
rotary_emb, norm and the model's lm_head); attention, masks, positions and KV caches are written here.

    inputs_embeds [B, S, D] (left-padded), position ids = cumsum(attention_mask) - 1
        |
        v   block 0: every token                         caches of layers 0..K1-1: S keys
    layers 0 .. K1-2
        |  hidden entering layer K1-1 --> score (layer K1-1's input_layernorm, q_proj, k_proj:
        |                                 last token's query . alive image keys / sqrt(d), per head,
        |                                 softmax over image keys only, mean over heads)
    layer K1-1                                      stage 1: top int(n (1-R)) [U grid], sorted
        |  gather text + kept image tokens (original position ids kept)
        v   block 1                                      caches of layers K1..K2-1: S - n + n1 keys
    layers K1 .. K2-1   (the same at K2: stage 2 keeps int(n1 (1-R)^2) of the n1 survivors, no grid)
        v   block 2                                      caches of layers K2..L-1: S - n + n2 keys
    norm -> lm_head (last position) -> greedy token
        |
    decode step t: position = unpruned length + t; the new token is appended to every layer's cache and
    attends to all of it (each block's cache has its own length and padding mask)

FEATHER scores without RoPE (`rope_scores=False`), FastV with the tokens' RoPE position ids. Per-row
kept counts differ (the stage-1 union is data-dependent), so after a gather rows are re-left-padded to the
longest one and the padding is masked: padding keys are never attended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FEATHER_LAYERS = (8, 16)  # prune points of the 32-layer LLaVA-1.5 LLM (first layer that sees fewer tokens)
FEATHER_REDUCTION = 0.7
FEATHER_STRIDE = 3
FASTV_LAYERS = (3,)
FASTV_REDUCTION = 0.75
REFERENCE_DEPTH = 32  # the LLM depth the published prune layers are for


def scale_prune_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Published prune points scaled to an LLM of `num_layers` layers: K * L / 32 rounded half up, at
    least 1, and every point must stay a real split (1 <= K < L, strictly increasing)."""
    scaled = tuple(max(1, (2 * k * num_layers + REFERENCE_DEPTH) // (2 * REFERENCE_DEPTH)) for k in layers)
    check_prune_layers(scaled, num_layers)
    return scaled


def check_prune_layers(layers: tuple[int, ...], num_layers: int) -> None:
    if any(not 1 <= k < num_layers for k in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"prune layers {layers} must be strictly increasing within 1..{num_layers - 1}")


def uniform_grid(rows: int, cols: int, stride: int, sub_images: int = 1) -> list[int]:
    """Window indices of `grid[::stride, ::stride]` of each sub-image, the sub-images laid out one after
    the other in raster order (LLaVA-1.5: one 24x24 image, stride 3 -> 64 indices)."""
    one = [r * cols + c for r in range(0, rows, stride) for c in range(0, cols, stride)]
    return [s * rows * cols + i for s in range(sub_images) for i in one]


def keep_count(n_alive: int, reduction: float, stage: int) -> int:
    """Tokens kept by score at stage 1, 2, ...: int(n * (1 - R) ** stage) (FEATHER stage 2: (1 - R)^2)."""
    return int(n_alive * (1 - reduction) ** stage)


@dataclass
class Stage:
    """One prune point, per row: what was scored and what was kept (window indices 0..n-1, ascending)."""

    layer: int  # K: the first layer that sees the kept tokens
    scores: list[torch.Tensor] = field(default_factory=list)  # per row [n_alive], aligned with `alive`
    alive: list[list[int]] = field(default_factory=list)  # per row: image tokens entering the stage
    topk: list[list[int]] = field(default_factory=list)  # per row: the top-k by score (ascending)
    kept: list[list[int]] = field(default_factory=list)  # per row: top-k [U grid], ascending


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] greedy tokens
    logits: list[torch.Tensor]  # N x [B, V], the logits each token was chosen from
    stages: list[Stage]  # one per prune point
    cache_lengths: list[list[int]]  # per layer, per row: valid keys in the cache after prefill


class _Block:
    """The sequence one block of layers sees: hidden states, padding mask, position ids ([B, S_b])."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, image_at: list[list[int]]):
        self.hidden, self.mask, self.positions = hidden, mask, positions  # [B, S_b, D], [B, S_b], [B, S_b]
        self.image_at = image_at  # per row: sequence index of each alive image token, in window order

    def gather(self, keep_rows: list[list[int]], kept_image_at: list[list[int]]) -> _Block:
        """Rows keep the sequence indices `keep_rows` (ascending); re-left-pad to the longest row."""
        length = max(len(k) for k in keep_rows)
        batch, _, dim = self.hidden.shape
        hidden = self.hidden.new_zeros(batch, length, dim)
        mask = self.mask.new_zeros(batch, length)
        positions = self.positions.new_zeros(batch, length)
        image_at = []
        for row, keep in enumerate(keep_rows):
            pad = length - len(keep)
            index = torch.tensor(keep, dtype=torch.long)
            hidden[row, pad:] = self.hidden[row, index]
            mask[row, pad:] = self.mask[row, index]
            positions[row, pad:] = self.positions[row, index]  # original RoPE positions, not renumbered
            new_index = {old: pad + i for i, old in enumerate(keep)}
            image_at.append([new_index[i] for i in kept_image_at[row]])
        return _Block(hidden, mask, positions, image_at)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, Dh], cos/sin [B, S, Dh] -> x rotated by its tokens' positions."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)  # [B, H, S, Dh]


class _Decoder:
    """The LLM of a LLaVA model, run layer by layer with one (key, value) cache per layer."""

    def __init__(self, model):
        self.llm = model.model.language_model
        self.lm_head = model.lm_head
        config = model.config.text_config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.llm.layers)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.llm.rotary_emb(hidden, positions)  # cos, sin [B, S, Dh]

    def layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decoder layer over new tokens `hidden` [B, S, D] appended to the layer's cache.
        mask [B, S]: 1 real / 0 padding of the new tokens. Queries see every valid cached key and the
        valid new keys up to themselves (causal); each query always sees itself, so padding rows stay finite."""
        layer = self.llm.layers[index]
        attn = layer.self_attn
        cos, sin = self.rotary(hidden, positions)
        x = layer.input_layernorm(hidden)
        q = _rope(_heads(attn.q_proj(x), self.heads), cos, sin)  # [B, H, S, Dh]
        k = _rope(_heads(attn.k_proj(x), self.kv_heads), cos, sin)  # [B, Hkv, S, Dh]
        v = _heads(attn.v_proj(x), self.kv_heads)
        if self.cache[index] is not None:
            past_k, past_v, past_mask = self.cache[index]
            k, v, key_mask = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2), torch.cat([past_mask, mask], 1)
        else:
            key_mask = mask
        self.cache[index] = (k, v, key_mask)
        seq, total = hidden.shape[1], k.shape[2]
        query_at = torch.arange(seq).unsqueeze(1) + (total - seq)  # [S, 1]
        key_at = torch.arange(total).unsqueeze(0)  # [1, T]
        allowed = ((key_at <= query_at).unsqueeze(0) & key_mask.bool().unsqueeze(1)) | (key_at == query_at)  # [B, S, T]
        repeat = self.heads // self.kv_heads  # query head h reads KV head h // repeat
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # [B, H, T, Dh]
        logits = q @ k.transpose(-1, -2) / self.head_dim**0.5  # [B, H, S, T]
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        out = torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v  # [B, H, S, Dh]
        out = out.transpose(1, 2).reshape(hidden.shape[0], seq, -1)
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def score(self, index: int, block: _Block, rope: bool) -> list[torch.Tensor]:
        """Per row [n_alive]: the last token's attention over the alive image tokens, from layer `index`'s
        input_layernorm, q_proj and k_proj on the hidden states entering it (softmax over those keys only,
        mean over heads; RoPE on q and k only when `rope`)."""
        layer = self.llm.layers[index]
        x = layer.input_layernorm(block.hidden)
        q = _heads(layer.self_attn.q_proj(x), self.heads)  # [B, H, S, Dh]
        k = _heads(layer.self_attn.k_proj(x), self.kv_heads)  # [B, Hkv, S, Dh]
        if rope:
            cos, sin = self.rotary(block.hidden, block.positions)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # [B, H, S, Dh]
        scores = []
        for row, image_at in enumerate(block.image_at):
            keys = k[row][:, image_at]  # [H, n_alive, Dh]
            logits = keys @ q[row, :, -1].unsqueeze(-1) / self.head_dim**0.5  # [H, n_alive, 1]
            scores.append(torch.softmax(logits[..., 0].float(), dim=-1).mean(dim=0))  # [n_alive]
        return scores

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.llm.norm(hidden[:, -1]))  # [B, V]


def _select(stage: Stage, scores: list[torch.Tensor], alive: list[list[int]], count: list[int],
            grid: list[int] | None) -> None:
    """Fill `stage`: per row, top-`count` alive tokens by score, union the grid, ascending."""
    for row, (score, window) in enumerate(zip(scores, alive)):
        top = torch.topk(score, count[row]).indices.tolist()
        topk = sorted(window[i] for i in top)
        kept = sorted(set(topk) | (set(grid) & set(window) if grid is not None else set()))
        stage.scores.append(score)
        stage.alive.append(list(window))
        stage.topk.append(topk)
        stage.kept.append(kept)


@torch.no_grad()
def generate(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, image_positions: torch.Tensor,
             max_new_tokens: int, *, prune_layers: tuple[int, ...] = (), reduction: float = FEATHER_REDUCTION,
             grid: list[int] | None = None, rope_scores: bool = False) -> Generation:
    """Greedy generation with in-LLM pruning.

    inputs_embeds [B, S, D] left-padded, attention_mask [B, S]; image_positions [B, n]: the sequence index
    of each image token, window order (LLaVA-1.5: a contiguous run of 576). prune_layers: the first layer
    after each prune point (() = no pruning). reduction R in [0, 1) (0 keeps every token: a test hook that
    must reproduce the unpruned model). grid: window indices kept at stage 1 whatever their score (FEATHER;
    None for FastV). rope_scores: score with RoPE (FastV) or without (FEATHER).
    """
    decoder = _Decoder(model)
    num_layers = len(decoder.llm.layers)
    check_prune_layers(tuple(prune_layers), num_layers)
    if not 0 <= reduction < 1:
        raise ValueError(f"reduction {reduction} must be in [0, 1)")
    n = image_positions.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # HF's rule
    block = _Block(inputs_embeds, attention_mask.long(), positions, image_positions.tolist())
    alive = [list(range(n)) for _ in range(len(inputs_embeds))]  # window indices of the alive image tokens
    stages: list[Stage] = []
    for index in range(num_layers):
        if index + 1 in prune_layers:  # layer `index` is K-1 of a prune point
            stage = Stage(layer=index + 1)
            count = [keep_count(len(a), reduction, len(stages) + 1) for a in alive]
            _select(stage, decoder.score(index, block, rope_scores), alive, count, grid if not stages else None)
            stages.append(stage)
        hidden = decoder.layer(index, block.hidden, block.mask, block.positions)
        block = _Block(hidden, block.mask, block.positions, block.image_at)
        if index + 1 in prune_layers:
            keep_rows, kept_at = [], []
            for row, (window, kept) in enumerate(zip(alive, stage.kept)):
                at = dict(zip(window, block.image_at[row]))
                dropped = {at[i] for i in window} - {at[i] for i in kept}
                keep_rows.append([i for i in range(block.hidden.shape[1]) if i not in dropped])
                kept_at.append([at[i] for i in kept])
            block = block.gather(keep_rows, kept_at)
            alive = [list(k) for k in stage.kept]
    cache_lengths = [[int(m.sum()) for m in decoder.cache[i][2]] for i in range(num_layers)]
    unpruned_length = attention_mask.long().sum(-1)  # [B]: decoding continues from here

    logits = [decoder.head(block.hidden)]
    tokens = [logits[-1].argmax(-1)]
    embed = decoder.llm.embed_tokens
    ones = attention_mask.new_ones(len(inputs_embeds), 1).long()
    for step in range(max_new_tokens - 1):
        hidden = embed(tokens[-1]).unsqueeze(1)  # [B, 1, D]
        position = (unpruned_length + step).unsqueeze(1)  # [B, 1]
        for index in range(num_layers):
            hidden = decoder.layer(index, hidden, ones, position)
        logits.append(decoder.head(hidden))
        tokens.append(logits[-1].argmax(-1))
    return Generation(torch.stack(tokens, 1), logits, stages, cache_lengths)


def feather(model, inputs_embeds, attention_mask, image_positions, max_new_tokens, *,
            prune_layers: tuple[int, ...] = FEATHER_LAYERS, reduction: float = FEATHER_REDUCTION,
            stride: int = FEATHER_STRIDE, grid_shape: tuple[int, int] = (24, 24), sub_images: int = 1) -> Generation:
    """FEATHER: two prune points, no RoPE in the score, stage 1 keeps top-k U grid[::s, ::s]."""
    grid = uniform_grid(*grid_shape, stride, sub_images)
    return generate(model, inputs_embeds, attention_mask, image_positions, max_new_tokens,
                    prune_layers=prune_layers, reduction=reduction, grid=grid, rope_scores=False)


def fastv(model, inputs_embeds, attention_mask, image_positions, max_new_tokens, *,
          prune_layers: tuple[int, ...] = FASTV_LAYERS, reduction: float = FASTV_REDUCTION) -> Generation:
    """FastV: one prune point, RoPE in the score, top int(n (1 - R)), no grid."""
    return generate(model, inputs_embeds, attention_mask, image_positions, max_new_tokens,
                    prune_layers=prune_layers, reduction=reduction, grid=None, rope_scores=True)

"""The LLM loop: prefill, decode one token, decode n tokens, with the KV cache kept between calls.

Split the way gpt-fast splits it. The cache lives in the runner's bound values (`infer_bound`: ONNX Runtime
OrtValues with I/O binding, TensorRT device buffers): the `present` outputs of one call are bound as the
`past` inputs of the next, never converted to numpy or copied by the runtime (the graph's own concat is the
only copy). A `--target onnxruntime` export (`llm.kv_cache` "buffer") has no copy at all: `KVCache` keeps one
host buffer per tensor, passed `into` the runner as both past input and present output, and the graph's
GroupQueryAttention writes the new positions in place. An export pruned inside the LLM (FEATHER, FastV)
runs as blocks, each with its own cache; at a prune point, during prefill, the select graph picks the kept
tokens and `gather_kept` builds the next block's sequence on the host.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from contract import names
from contract.errors import InputError
from contract.manifest import LLMSpec
from contract.positions import prefill_position_ids
from runtime.backends.base import Runner, to_numpy


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False  # False: greedy (argmax), as HF generate's default
    temperature: float = 1.0  # > 0; divides the logits before sampling
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]
    seed: int | None = None  # for reproducible sampling

    def __post_init__(self) -> None:
        # Each test reads "not (valid)", so NaN and values of the wrong type are refused too.
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise InputError(f"temperature={self.temperature!r} must be a number > 0 (use do_sample=False for greedy)")
        if not (_is_integer(self.top_k) and self.top_k >= 0):
            raise InputError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables the filter)")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p={self.top_p!r} must be a number in (0, 1]")
        if not (self.seed is None or (_is_integer(self.seed) and self.seed >= 0)):
            raise InputError(f"seed={self.seed!r} must be an integer >= 0 or None")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class KVCache:
    """Past keys/values of the layers of one LLM graph (block), [B, Hkv, P, Dh] each.

    `llm.kv_cache` "concat": backend values, the graph's `present` outputs taken as the next call's `past`.
    "buffer" (--target onnxruntime): one host array [B, Hkv, capacity, Dh] per tensor, bound as both past and
    present; the graph writes the new positions in place. Capacity grows (doubling, a copy of the filled
    positions) only when a call would overflow it, up to llm.max_seq_len: no allocation or copy per step."""

    GRANULE = 256  # buffer capacity: the first call's length plus at least this, a multiple of it

    def __init__(self, llm: LLMSpec, batch: int, dtype=np.float32, layers: range | None = None):
        self.llm = llm
        self.buffered = llm.kv_cache == "buffer"
        self.past, self.present = llm.cache_names(layers)
        empty = np.zeros((batch, llm.num_kv_heads, 0, llm.head_dim), dtype=dtype)
        self.values: dict[str, object] = {name: empty for name in self.past}
        self.length = 0
        self.handles: dict = {}  # the backend's own views of the buffers, reused between calls (infer_bound)

    def reserve(self, new_tokens: int) -> dict[str, np.ndarray]:
        """Before a call that adds `new_tokens`: the arrays its present outputs go `into` (buffer mode; {}
        otherwise), grown if they would overflow."""
        if not self.buffered:
            return {}
        needed = self.length + new_tokens
        capacity = next(iter(self.values.values())).shape[2]
        if needed > capacity:
            granules = -(-(needed + self.GRANULE) // self.GRANULE)
            capacity = min(max(granules * self.GRANULE, 2 * capacity), max(self.llm.max_seq_len, needed))
            for name, old in self.values.items():
                grown = np.zeros((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
                grown[:, :, :self.length] = old[:, :, :self.length]
                self.values[name] = grown
        return {present: self.values[past] for past, present in zip(self.past, self.present)}

    def update(self, outputs: dict, new_tokens: int) -> None:
        """Take the graph's `present` outputs as the next call's `past` inputs (no copy; in buffer mode they
        are the same arrays already)."""
        if not self.buffered:
            for past, present in zip(self.past, self.present):
                self.values[past] = outputs[present]
        self.length += new_tokens

    def filled(self) -> dict[str, np.ndarray]:
        """The cache as host arrays [B, Hkv, P, Dh] (a copy)."""
        return {name: to_numpy(value)[:, :, :self.length].copy() for name, value in self.values.items()}

    def load(self, values: dict[str, np.ndarray], length: int) -> None:
        """Start from the given cache [B, Hkv, P, Dh] per tensor (a prompt prefix)."""
        self.values, self.length = dict(values), length
        if self.buffered:  # copied into buffers with room for what follows
            self.values = {name: value[:, :, :0] for name, value in values.items()}
            self.length = 0
            self.reserve(length)
            for name, value in values.items():
                self.values[name][:, :, :length] = value
            self.length = length


@dataclass(frozen=True)
class Prefix:
    """KV cache of the tokens before the first varying one (text before the image), [1, Hkv, P, Dh] each."""

    values: dict[str, np.ndarray]
    length: int  # P


@dataclass(frozen=True)
class Block:
    """One LLM graph: the whole decoder, or one block of it between prune points (FEATHER, FastV)."""

    runner: Runner
    layers: range
    select: dict[str, Runner] = field(default_factory=dict)  # modality -> select graph of the prune point after it


@dataclass
class Stage:
    """What one prune point kept, per row: window indices (into the item's unpruned tokens, layout order)."""

    kept: np.ndarray  # [B, slots] int64: kept indices ascending, then filler
    valid: np.ndarray  # [B, slots] bool: False = filler (not kept)

    def row(self, row: int) -> np.ndarray:
        return self.kept[row][self.valid[row]]


@dataclass
class DecodeState:
    """Everything the loop carries from one step to the next."""

    caches: list[KVCache]  # one per block
    masks: list[np.ndarray]  # per block [B, P_b] int64, 1 = token, 0 = padding (left, or a pruned slot)
    next_position: np.ndarray  # [B] int64
    finished: np.ndarray  # [B] bool
    length: int  # tokens of the unpruned sequence so far (padding included): what max_seq_len bounds
    stages: list[Stage] = field(default_factory=list)  # one per prune point
    step_times: list[float] = field(default_factory=list)  # wall time of each decode step
    graph_times: list[float] = field(default_factory=list)  # time inside the LLM graphs of each call

    @property
    def cache(self) -> KVCache:
        """The KV cache of an export with one LLM graph."""
        if len(self.caches) != 1:
            raise InputError("this export's LLM runs as several blocks, each with its own KV cache: use .caches")
        return self.caches[0]


class Generator:
    """Runs the LLM graph(s) over input embeddings; token ids are embedded with the exported table.

    blocks: the LLM graphs in order (one, or the blocks of an in-LLM pruned export). At a prune point, during
    prefill only, the block's prune_logits over the item's window go through the modality's select graph,
    and the next block gets the text tokens plus the kept ones, in sequence order with their original
    position ids; filler slots and left padding are masked (runtime/README: FEATHER)."""

    def __init__(self, blocks: list[Block], llm: LLMSpec, embeddings: np.ndarray):
        self.blocks = blocks
        self.runner = blocks[0].runner
        self.llm = llm
        self.embeddings = embeddings  # [V, D]
        self.eos = np.array(llm.eos_token_ids, dtype=np.int64)

    def _block(self, state: DecodeState, index: int, hidden, position_ids: np.ndarray) -> dict:
        block, cache = self.blocks[index], state.caches[index]
        into = cache.reserve(position_ids.shape[1])
        feeds = {
            names.INPUTS_EMBEDS: hidden,
            names.ATTENTION_MASK: state.masks[index],
            names.POSITION_IDS: position_ids,
            **cache.values,
        }
        batch, seq = position_ids.shape
        if not into:
            outputs = block.runner.infer_bound(feeds)
        elif batch == 1 or seq == 1 or cache.length == 0:
            outputs = block.runner.infer_bound(feeds, into=into, handles=cache.handles)
        else:  # GroupQueryAttention takes several new tokens after a past (a prompt prefix) one row at a time;
            # a row of a buffer is a contiguous view, written in place like the whole
            rows = [block.runner.infer_bound({k: v[r:r + 1] for k, v in feeds.items()},
                                             into={k: v[r:r + 1] for k, v in into.items()}) for r in range(batch)]
            outputs = {k: np.concatenate([to_numpy(row[k]) for row in rows]) for k in rows[0] if k not in into}
            outputs.update(into)
        cache.update(outputs, seq)
        return outputs

    def prefill(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, prefix: Prefix | None = None,
                position_ids: np.ndarray | None = None, window: np.ndarray | None = None,
                modality: str | None = None) -> tuple[DecodeState, np.ndarray]:
        """inputs_embeds [B, S, D] (left-padded), attention_mask [B, S] -> state, next-token logits [B, V].

        prefix: the KV cache of tokens that come before every row (`compute_prefix`), fed as the past; the
        rows are then the rest of the sequence, at positions P.. (padding sits between prefix and row).
        position_ids [B, S]: default consecutive from each row's first token (HF's rule). window [B, n]:
        sequence index of each of the item's visual tokens in layout order (needed when the LLM prunes);
        modality: whose select graphs rank them."""
        batch = inputs_embeds.shape[0]
        caches = [KVCache(self.llm, batch, inputs_embeds.dtype, block.layers) for block in self.blocks]
        if prefix is not None:
            if len(self.blocks) != 1:
                raise InputError("a cached prompt prefix needs an export with one LLM graph (not FEATHER / FastV)")
            attention_mask = np.concatenate([np.ones((batch, prefix.length), np.int64), attention_mask], axis=1)
            caches[0].load({name: np.repeat(value, batch, axis=0) for name, value in prefix.values.items()},
                           prefix.length)
        if position_ids is None:
            position_ids = prefill_position_ids(attention_mask)[:, attention_mask.shape[1] - inputs_embeds.shape[1]:]
        mask = attention_mask.astype(np.int64)
        state = DecodeState(
            caches=caches,
            masks=[mask] * len(self.blocks),
            next_position=position_ids[:, -1] + 1,
            finished=np.zeros(batch, dtype=bool),
            length=attention_mask.shape[1],
        )
        start = time.perf_counter()
        hidden = inputs_embeds
        if len(self.blocks) > 1:
            if window is None or modality is None:
                raise InputError("this export prunes inside the LLM: prefill needs the visual tokens' window and modality")
            window_ids = np.broadcast_to(np.arange(window.shape[1]), window.shape)  # [B, n] window index per slot
            window_valid = np.ones(window.shape, np.int64)
        for index, block in enumerate(self.blocks):
            state.masks[index] = mask
            outputs = self._block(state, index, hidden, position_ids)
            if index == len(self.blocks) - 1:
                break
            if modality not in block.select:
                raise InputError(f"this export has no selection for modality {modality!r}")
            prune = to_numpy(outputs[names.PRUNE_LOGITS])  # [B, H, S]
            chosen = block.select[modality].infer({
                names.WINDOW_LOGITS: np.ascontiguousarray(np.take_along_axis(prune, window[:, None, :], axis=2)),
                names.WINDOW_VALID: window_valid,
            })
            slots, valid = chosen[names.KEEP_SLOTS], chosen[names.KEEP_VALID]  # [B, slots] each
            window_ids = np.take_along_axis(window_ids, slots, axis=1)
            state.stages.append(Stage(window_ids, valid.astype(bool)))
            hidden, mask, position_ids, window = gather_kept(
                to_numpy(outputs[names.HIDDEN_STATES]), mask, position_ids, window, slots, valid)
            window_valid = valid.astype(np.int64)
        state.graph_times.append(time.perf_counter() - start)
        return state, to_numpy(outputs[names.LOGITS])

    def compute_prefix(self, inputs_embeds: np.ndarray) -> Prefix:
        """The KV cache of a fixed leading text, inputs_embeds [1, P, D], read back to host arrays once: every
        later prefill feeds the same arrays (a backend may reuse its output buffers between calls)."""
        state, _ = self.prefill(inputs_embeds, np.ones(inputs_embeds.shape[:2], np.int64))
        return Prefix(state.cache.filled(), inputs_embeds.shape[1])

    def decode_one_token(self, state: DecodeState, tokens: np.ndarray) -> np.ndarray:
        """tokens [B] -> next-token logits [B, V]. Every block appends the token to its own cache."""
        batch = tokens.shape[0]
        ones = np.ones((batch, 1), np.int64)
        state.masks = [np.concatenate([mask, ones], axis=1) for mask in state.masks]
        hidden = self.embeddings[tokens][:, None, :]  # [B, 1, D]
        position_ids = state.next_position[:, None]  # [B, 1]
        state.next_position = state.next_position + 1
        state.length += 1
        start = time.perf_counter()
        for index in range(len(self.blocks)):
            outputs = self._block(state, index, hidden, position_ids)
            hidden = outputs.get(names.HIDDEN_STATES)  # stays in the backend's memory
        state.graph_times.append(time.perf_counter() - start)
        return to_numpy(outputs[names.LOGITS])

    def teacher_forced(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [N] (one row) -> next-token logits after each prefix ids[:1], ..., ids[:N-1], [N-1, V]: the
        first token prefilled alone, then one real token per decode step. What a quality measurement compares
        (a low-bit LLM graph against the float one, on the same text)."""
        state, logits = self.prefill(self.embeddings[ids[:1]][None], np.ones((1, 1), np.int64))
        out = [logits[0]]
        for token in ids[1:-1]:
            out.append(self.decode_one_token(state, np.array([token]))[0])
        return np.stack(out)

    def decode_n_tokens(self, state: DecodeState, logits: np.ndarray, max_new_tokens: int,
                        sampling: SamplingOptions) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (tokens [B], logits [B, V] they were chosen from) until every row hit EOS, the token
        budget or the export's maximum sequence length. Finished rows keep receiving the pad token."""
        rng = np.random.default_rng(sampling.seed)
        for step in range(max_new_tokens):
            tokens = choose(logits, sampling, rng)
            tokens = np.where(state.finished, self.llm.pad_token_id, tokens)
            yield tokens, logits
            state.finished |= np.isin(tokens, self.eos)
            if state.finished.all() or step == max_new_tokens - 1 or state.length >= self.llm.max_seq_len:
                return
            start = time.perf_counter()
            logits = self.decode_one_token(state, tokens)
            state.step_times.append(time.perf_counter() - start)


def gather_kept(hidden: np.ndarray, mask: np.ndarray, positions: np.ndarray, window: np.ndarray,
                slots: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The next block's sequence after a prune point, per row: every position outside the window (text and
    left padding) and the chosen window slots, real tokens in their sequence order after the padding.

    hidden [B, S, D], mask / positions [B, S], window [B, n] (sequence index of each window slot), slots /
    valid [B, k] (the select graph's output) -> hidden [B, S - n + k, D], mask, positions (original ones;
    0 on padding), window [B, k] (where each chosen slot now sits). A filler slot (valid 0) becomes padding.
    """
    batch, length, _ = hidden.shape
    rows = np.arange(batch)[:, None]
    in_window = np.zeros((batch, length), bool)
    in_window[rows, window] = True
    rest = np.argsort(in_window, axis=1, kind="stable")[:, :length - window.shape[1]]  # [B, S - n] ascending
    index = np.concatenate([rest, np.take_along_axis(window, slots, axis=1)], axis=1)  # [B, S']
    real = np.concatenate([np.take_along_axis(mask, rest, axis=1) > 0, valid > 0], axis=1)  # [B, S']
    order = np.argsort(np.where(real, index, -1), axis=1, kind="stable")  # padding first, then ascending
    index, real = np.take_along_axis(index, order, axis=1), np.take_along_axis(real, order, axis=1)
    new_window = np.argsort(order, axis=1, kind="stable")[:, rest.shape[1]:]  # [B, k]
    return (np.ascontiguousarray(hidden[rows, index]), real.astype(np.int64),
            np.where(real, positions[rows, index], 0).astype(np.int64), new_window)


def choose(logits: np.ndarray, sampling: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax, or a sample after temperature / top-k / top-p filtering."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    logits = logits.astype(np.float64)
    # Shifted before dividing: the top logit becomes exactly 0, so a tiny temperature overflows to -inf (what
    # it means: probability 0), never to inf - inf = NaN.
    with np.errstate(over="ignore"):
        scaled = (logits - logits.max(axis=-1, keepdims=True)) / sampling.temperature  # [B, V], max 0
    top_k = min(sampling.top_k, scaled.shape[-1])  # a top_k beyond the vocabulary filters nothing, as in HF
    if top_k:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        drop = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= sampling.top_p  # keep the smallest set reaching p
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_probs), axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[1], p=row) for row in probs], dtype=np.int64)

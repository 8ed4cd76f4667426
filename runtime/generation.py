"""The LLM loop: prefill, decode one token, decode n tokens, with the KV cache kept between calls.

Split the way gpt-fast splits it. The cache lives in the runner's bound values (`infer_bound`: ONNX Runtime
OrtValues with I/O binding, TensorRT device buffers): the `present` outputs of one call are bound as the
`past` inputs of the next, never converted to numpy or copied by the runtime (the graph's own concat is the
only copy).
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
    """Per-layer past keys/values as backend values, [B, Hkv, P, Dh] each."""

    def __init__(self, llm: LLMSpec, batch: int, dtype=np.float32):
        empty = np.zeros((batch, llm.num_kv_heads, 0, llm.head_dim), dtype=dtype)
        self.llm = llm
        self.values: dict[str, object] = {}
        for i in range(llm.num_layers):
            self.values[llm.past_key.format(i)] = empty
            self.values[llm.past_value.format(i)] = empty
        self.length = 0

    def update(self, outputs: dict, new_tokens: int) -> None:
        """Take the graph's `present` outputs as the next call's `past` inputs (no copy)."""
        for i in range(self.llm.num_layers):
            self.values[self.llm.past_key.format(i)] = outputs[self.llm.present_key.format(i)]
            self.values[self.llm.past_value.format(i)] = outputs[self.llm.present_value.format(i)]
        self.length += new_tokens


@dataclass(frozen=True)
class Prefix:
    """KV cache of the tokens before the first varying one (text before the image), [1, Hkv, P, Dh] each."""

    values: dict[str, np.ndarray]
    length: int  # P


@dataclass
class DecodeState:
    """Everything the loop carries from one step to the next."""

    cache: KVCache
    attention_mask: np.ndarray  # [B, P] int64, 1 = token, 0 = left padding
    next_position: np.ndarray  # [B] int64
    finished: np.ndarray  # [B] bool
    step_times: list[float] = field(default_factory=list)  # wall time of each decode step
    graph_times: list[float] = field(default_factory=list)  # time inside the LLM graph call of each step


class Generator:
    """Runs the LLM graph over input embeddings; token ids are embedded with the exported table."""

    def __init__(self, runner: Runner, llm: LLMSpec, embeddings: np.ndarray):
        self.runner = runner
        self.llm = llm
        self.embeddings = embeddings  # [V, D]
        self.eos = np.array(llm.eos_token_ids, dtype=np.int64)

    def _forward(self, state: DecodeState, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = {
            names.INPUTS_EMBEDS: inputs_embeds,
            names.ATTENTION_MASK: state.attention_mask,
            names.POSITION_IDS: position_ids,
            **state.cache.values,
        }
        start = time.perf_counter()
        outputs = self.runner.infer_bound(feeds)
        state.graph_times.append(time.perf_counter() - start)
        state.cache.update(outputs, inputs_embeds.shape[1])
        return outputs[names.LOGITS].numpy()  # [B, V]

    def prefill(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                prefix: Prefix | None = None) -> tuple[DecodeState, np.ndarray]:
        """inputs_embeds [B, S, D] (left-padded), attention_mask [B, S] -> state, next-token logits [B, V].

        prefix: the KV cache of tokens that come before every row (`compute_prefix`), fed as the past; the
        rows are then the rest of the sequence, at positions P.. (padding sits between prefix and row)."""
        batch = inputs_embeds.shape[0]
        cache = KVCache(self.llm, batch, inputs_embeds.dtype)
        if prefix is not None:
            attention_mask = np.concatenate([np.ones((batch, prefix.length), np.int64), attention_mask], axis=1)
            cache.values = {name: np.repeat(value, batch, axis=0) for name, value in prefix.values.items()}
            cache.length = prefix.length
        position_ids = prefill_position_ids(attention_mask)[:, attention_mask.shape[1] - inputs_embeds.shape[1]:]
        state = DecodeState(
            cache=cache,
            attention_mask=attention_mask.astype(np.int64),
            next_position=position_ids[:, -1] + 1,
            finished=np.zeros(batch, dtype=bool),
        )
        return state, self._forward(state, inputs_embeds, position_ids)

    def compute_prefix(self, inputs_embeds: np.ndarray) -> Prefix:
        """The KV cache of a fixed leading text, inputs_embeds [1, P, D], read back to host arrays once: every
        later prefill feeds the same arrays (a backend may reuse its output buffers between calls)."""
        state, _ = self.prefill(inputs_embeds, np.ones(inputs_embeds.shape[:2], np.int64))
        return Prefix({name: to_numpy(value) for name, value in state.cache.values.items()}, inputs_embeds.shape[1])

    def decode_one_token(self, state: DecodeState, tokens: np.ndarray) -> np.ndarray:
        """tokens [B] -> next-token logits [B, V]."""
        batch = tokens.shape[0]
        state.attention_mask = np.concatenate([state.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
        inputs_embeds = self.embeddings[tokens][:, None, :]  # [B, 1, D]
        position_ids = state.next_position[:, None]  # [B, 1]
        state.next_position = state.next_position + 1
        return self._forward(state, inputs_embeds, position_ids)

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
            if state.finished.all() or step == max_new_tokens - 1 or state.cache.length >= self.llm.max_seq_len:
                return
            start = time.perf_counter()
            logits = self.decode_one_token(state, tokens)
            state.step_times.append(time.perf_counter() - start)


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

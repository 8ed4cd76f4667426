"""The perception loop: frames from a source in, one answer per frame the model had time for.

    source --capture thread--> slot (one frame; live sources: the newest overwrites it) --take (every S)-->
      encode (vision, projector) --> splice --> prefill (prompt prefix KV reused) --> choices: scores of each
      choice's first token | text: greedy decode until EOS, max_new_tokens or the deadline --> Answer

Latest frame wins: a live source (camera, stream, realtime file, iterable) never waits for the model; the
slot keeps its newest frame and counts the ones it overwrote. A file or a folder waits, so every frame is
answered. Answers are produced only as fast as the caller iterates (nothing queues up), and closing the
loop (break, `close()`, Ctrl-C) stops the capture thread and closes the source.

overlap=True encodes the next frame (in a second thread) while the current one is prefilled and decoded.
"""

from __future__ import annotations

import numbers
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from contract.errors import InputError
from runtime.generation import SamplingOptions
from runtime.pipeline import Timings
from runtime.sources import Source, open_source

MAX_BAD_IN_A_ROW = 100  # consecutive frames that fail to load before the loop gives up on the source
JOIN_TIMEOUT_S = 5.0  # how long close() waits for a capture thread blocked inside the source


@dataclass
class Answer:
    frame_index: int  # the frame's position in the source (0-based, every frame read counted)
    captured_at: float  # time.time() when the capture thread received the frame
    text: str  # the answer, or the chosen choice
    choice: str | None  # with choices: the chosen one
    choice_probs: dict[str, float] | None  # with choices: softmax over the choices' first-token logits
    dropped: int  # frames since the previous answer that were not answered (overwritten or unreadable)
    age_s: float  # capture-to-answer latency: from capture until this answer was ready
    timings: Timings  # this frame's stages; total = from taking the frame to the answer
    finish_reason: str  # "choice", "eos", "length", "max_seq_len" or "deadline"
    token_ids: list[int] = field(default_factory=list)  # generated tokens (with choices: the chosen first token)


@dataclass
class Stats:
    seen: int = 0  # frames read from the source
    answered: int = 0
    dropped: int = 0  # overwritten by a newer frame before the model took them
    corrupt: int = 0  # could not be decoded or loaded: skipped
    reconnects: int = 0  # camera/stream reopened after a failed read


@dataclass
class _Frame:
    index: int
    image: object
    captured_at: float  # time.time()
    clock: float  # time.perf_counter() at capture


class _Slot:
    """One frame between the capture thread and the loop. latest=True: put() overwrites (and counts the
    overwritten frame as dropped); False: put() waits until the loop has taken the previous frame."""

    def __init__(self, latest: bool):
        self.latest = latest
        self.dropped = 0
        self.cond = threading.Condition()
        self.frame: _Frame | None = None
        self.ended = self.closed = False
        self.error: BaseException | None = None

    def put(self, frame: _Frame) -> bool:
        with self.cond:
            while not self.latest and self.frame is not None and not self.closed:
                self.cond.wait()
            if self.closed:
                return False
            if self.frame is not None:
                self.dropped += 1
            self.frame = frame
            self.cond.notify_all()
            return True

    def end(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.ended, self.error = True, error
            self.cond.notify_all()

    def take(self) -> _Frame | None:
        """The next frame; None once the source has ended (its error raised here) or the loop is closed."""
        with self.cond:
            while self.frame is None and not self.ended and not self.closed:
                self.cond.wait()
            frame, self.frame = self.frame, None
            self.cond.notify_all()
            if frame is not None and not self.latest:  # read ahead while the loop was busy: captured when taken
                frame.captured_at, frame.clock = time.time(), time.perf_counter()
            if frame is None and self.error is not None:
                raise self.error
            return None if self.closed else frame

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` unless the slot is closed first; True when it was closed."""
        with self.cond:
            return self.cond.wait_for(lambda: self.closed, timeout=seconds)


class Watch:
    """Iterate for Answers; `stats` counts frames; `close()` (or `with`) stops the capture and the source."""

    def __init__(self, pipe, source, prompt: str, *, choices: Sequence[str] | None = None,
                 max_new_tokens: int = 64, deadline_ms: float | None = None, every: float = 0.0,
                 overlap: bool = False, prefix_cache: bool = True, realtime: bool = False,
                 latest: bool | None = None, reconnects: int = 3):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if deadline_ms is not None and (not _is_number(deadline_ms) or not deadline_ms > 0):
            raise InputError(f"deadline_ms={deadline_ms!r} must be a number of milliseconds > 0, or None")
        if not _is_number(every) or not 0 <= every < 86400:
            raise InputError(f"every={every!r} must be a number of seconds in 0..86400 (0: as often as possible)")
        if overlap and pipe.backend == "tensorrt":  # the next projector run would overwrite this frame's tokens
            raise InputError("overlap=True needs the ONNX Runtime backend: TensorRT keeps a frame's visual tokens "
                             "in the projector's output buffer until the LLM reads them")
        self.pipe, self.max_new_tokens, self.every, self.overlap = pipe, int(max_new_tokens), float(every), overlap
        self.deadline_s = None if deadline_ms is None else float(deadline_ms) / 1000
        self.ids = pipe.prompt_ids(prompt)  # built once for every frame
        self.choices = None if choices is None else list(choices)
        self.choice_ids = None if choices is None else choice_token_ids(pipe, self.ids, self.choices)
        at = self.ids.index(pipe.modality("image").placeholder_id)  # text before the image: the same every frame
        self.prefix = None
        # The prefix is fed as past with several new tokens: TensorRT's LLM engine has profiles for prefill
        # (no past) and decode (one token) only, so there the prefix is simply recomputed with every frame.
        if prefix_cache and at > 0 and pipe.backend != "tensorrt" and len(pipe.generator.blocks) == 1:
            self.prefix = pipe.generator.compute_prefix(pipe.generator.embeddings[self.ids[:at]][None])  # [1, P, D]
        self._seen = self._answered = self._unreadable = 0
        self.source: Source = open_source(source, realtime, reconnects)
        self.slot = _Slot(self.source.live if latest is None else latest)
        self.thread = threading.Thread(target=self._capture, name="prunevlm-capture", daemon=True)  # started by __iter__
        self._last_take = -np.inf
        self._last_answered = -1
        self._bad_in_a_row = 0

    # --- capture thread ------------------------------------------------------------------------------
    def _capture(self) -> None:
        error = None
        try:
            for index, image in enumerate(self.source):
                self._seen = index + 1
                if not self.slot.put(_Frame(index, image, time.time(), time.perf_counter())):
                    break
        except BaseException as exc:  # raised again in the loop's thread (take), as it is
            error = exc
        finally:
            self.source.close()
            self.slot.end(error)

    @property
    def stats(self) -> Stats:
        return Stats(self._seen, self._answered, self.slot.dropped, self._unreadable + self.source.corrupt,
                     self.source.reconnects)

    # --- the loop ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Answer]:
        if self.thread.ident is not None or self.slot.closed:
            raise InputError("this watch loop was already iterated or closed: call pipe.watch(...) again")
        self.thread.start()
        executor = ThreadPoolExecutor(1, thread_name_prefix="prunevlm-encode") if self.overlap else None
        try:
            pending = executor.submit(self._take_and_encode) if executor else None
            while True:
                encoded = pending.result() if executor else self._take_and_encode()
                if encoded is None:
                    return
                if executor:  # the next frame is encoded while this one is answered
                    pending = executor.submit(self._take_and_encode)
                if encoded is not False:
                    yield self._answer(*encoded)
        finally:
            self.close()
            if executor:
                executor.shutdown(wait=True, cancel_futures=True)

    def _take_and_encode(self):
        """(frame, visual tokens, timings); False for a frame that did not load; None at the end."""
        wait = self._last_take + self.every - time.perf_counter()
        if wait > 0 and self.slot.sleep(wait):  # closed while waiting
            return None
        frame = self.slot.take()
        if frame is None:
            return None
        self._last_take = taken = time.perf_counter()
        timings = Timings()
        try:
            visual, keep = self.pipe.encode([frame.image], "image", timings)
        except InputError as exc:
            self._unreadable += 1
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= MAX_BAD_IN_A_ROW:
                raise InputError(f"{MAX_BAD_IN_A_ROW} frames in a row could not be loaded; the last: {exc}") from None
            return False
        self._bad_in_a_row = 0
        return frame, (visual[0], keep[0]), timings, taken

    def _answer(self, frame: _Frame, visual, timings: Timings, taken: float) -> Answer:
        pipe = self.pipe
        at = 0 if self.prefix is None else self.prefix.length
        visual, keep = visual
        length = len(self.ids) - 1 + int(np.prod(visual.shape[:-1]))  # the spliced prompt's tokens
        if length >= pipe.manifest.llm.max_seq_len:
            raise InputError(f"the prompt takes {length} tokens; this export handles at most "
                             f"{pipe.manifest.llm.max_seq_len - 1}: shorten the prompt")
        start = time.perf_counter()
        state, logits, mask = pipe.prefill([self.ids[at:]], [visual], [keep], "image", self.prefix)  # logits [1, V]
        timings.prefill = time.perf_counter() - start
        choice = probs = None
        if self.choice_ids is not None:
            scores = logits[0, self.choice_ids].astype(np.float64)
            weights = np.exp(scores - scores.max())
            best = int(np.argmax(scores))
            choice, reason, tokens = self.choices[best], "choice", [self.choice_ids[best]]
            probs = dict(zip(self.choices, (weights / weights.sum()).tolist()))
            text = choice
        else:
            tokens, reason = self._decode(state, logits, length, taken)
            timings.decode_steps, timings.decode_graph = state.step_times, state.graph_times[1:]
            text = pipe.tokenizer.decode(tokens, skip_special_tokens=True)
        now = time.perf_counter()
        timings.total = now - taken
        dropped = frame.index - self._last_answered - 1
        self._last_answered = frame.index
        self._answered += 1
        return Answer(frame.index, frame.captured_at, text, choice, probs, dropped, now - frame.clock, timings,
                      reason, tokens)

    def _decode(self, state, logits, length: int, taken: float) -> tuple[list[int], str]:
        """Greedy tokens until EOS, max_new_tokens, the sequence limit or the deadline (counted from taking
        the frame; checked after each token, so no decode step starts once it is spent)."""
        budget = min(self.max_new_tokens, self.pipe.manifest.llm.max_seq_len - length)
        eos = set(self.pipe.manifest.llm.eos_token_ids)
        deadline = None if self.deadline_s is None else taken + self.deadline_s
        tokens: list[int] = []
        for step_tokens, _ in self.pipe.generator.decode_n_tokens(state, logits, budget, SamplingOptions()):
            tokens.append(int(step_tokens[0]))
            if tokens[-1] in eos:
                return tokens, "eos"
            if len(tokens) < budget and deadline is not None and time.perf_counter() >= deadline:
                return tokens, "deadline"
        return tokens, "length" if len(tokens) >= self.max_new_tokens else "max_seq_len"

    def close(self) -> None:
        """Stop the capture thread and close the source (idempotent)."""
        self.slot.close()
        if self.thread.ident is None:  # never iterated: no thread owns the source
            self.source.close()
        elif self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(JOIN_TIMEOUT_S)  # a source blocked inside a read ends with its next frame

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def choice_token_ids(pipe, prompt_ids: list[int], choices: list[str]) -> list[int]:
    """Each choice's first token as the model would generate it right after the prompt: the choice is
    tokenised as the prompt's continuation, with a space before it unless the prompt ends in whitespace
    (LLaVA's "ASSISTANT:" is followed by " yes"; ChatML's "assistant\\n" by "yes"). Choices whose first
    tokens are the same cannot be told apart by one prefill and are refused."""
    if isinstance(choices, str) or len(choices) < 2:
        raise InputError(f"choices={choices!r} must be a list of at least 2 strings")
    tokenizer = pipe.tokenizer
    lead = "" if tokenizer.decode([prompt_ids[-1]])[-1:].isspace() else " "
    first: dict[int, str] = {}
    for choice in choices:
        if not isinstance(choice, str) or not choice.strip():
            raise InputError(f"choice {choice!r} must be a non-empty string")
        ids = tokenizer.encode(lead + choice.strip(), add_special_tokens=False).ids
        if ids[0] in first:
            raise InputError(f"choices {first[ids[0]]!r} and {choice!r} both begin with the token "
                             f"{tokenizer.id_to_token(ids[0])!r}; give choices whose first tokens differ")
        first[ids[0]] = choice
    return list(first)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))


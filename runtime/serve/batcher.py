"""Dynamic batching: requests collected for up to `max_wait_ms`, at most `max_batch` of them, run as one
`Pipeline.generate` call in one worker thread.

    handler (event loop) --submit(Job)--> queue --worker thread: take the first job, wait up to max_wait_ms for
    more with the same Sampling, at most max_batch--> Pipeline.generate(images, prompts, should_stop, on_text)
    --on_text / done / error, via loop.call_soon_threadsafe--> each job's own asyncio.Queue --> its client

What goes together: requests with equal `Sampling` (all greedy requests; sampled requests with the same
temperature and top_p). A request with a `seed` runs alone, so its answer depends on its seed only.
Per-request limits inside a batch: `max_new_tokens` is the batch's largest, and `should_stop(row)` ends a row
at its own max_tokens, at one of its stop strings, or when its client has gone (Job.cancel). A slow client
never holds the worker: events go into its unbounded queue and the worker moves on.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from dataclasses import dataclass, field

from contract.errors import UserError
from runtime.serve.metrics import Metrics
from runtime.serve.protocol import ApiError, ChatRequest, from_user_error


class StopMatcher:
    """Text pieces in, text safe to send out: holds back a tail that could still become a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        """Add a piece; return the newly releasable text. After a stop string, nothing more is released."""
        if self.stopped:
            return ""
        self.text += piece
        hits = [self.text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
            return self._release(len(self.text))
        hold = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])), default=0)
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out


@dataclass(eq=False)
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) / ("done", dict) / ("error", ApiError)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.matcher = StopMatcher(self.request.stop)
        self.tokens = 0

    def cancel(self) -> None:
        """The client has gone: its row stops at the next token, or it is dropped before it runs."""
        self.cancelled.set()

    def post(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    @property
    def key(self):
        sampling = self.request.sampling
        return self if sampling.seed is not None else sampling  # a seeded request matches only itself


class Batcher:
    """One worker thread in front of one Pipeline. `submit` from the event loop; `close` to stop."""

    def __init__(self, pipeline, max_batch: int, max_wait_ms: float, max_queue: int, metrics: Metrics):
        self.pipeline, self.max_batch, self.max_wait, self.max_queue = pipeline, max_batch, max_wait_ms / 1000, max_queue
        self.metrics = metrics
        self.queue: collections.deque[Job] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="prunevlm-batcher", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        with self.ready:
            if self.closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self.queue) >= self.max_queue:
                raise ApiError(503, f"the server is overloaded ({len(self.queue)} requests waiting); retry later",
                               type="server_error", code="overloaded")
            self.queue.append(job)
            self.metrics.queue_length.set(len(self.queue))
            self.ready.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()
        self.worker.join(timeout)

    # --- worker thread ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # a bug: every job of the batch gets a 500, the worker carries on
                for job in batch:
                    job.post("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
                self.metrics.errors.labels(code="500", type="server_error").inc()

    def _collect(self) -> list[Job] | None:
        """The oldest job and up to max_batch - 1 more with its key, waiting at most max_wait for them."""
        with self.ready:
            while not self.queue:
                if self.closed:
                    return None
                self.ready.wait()
            first = self.queue.popleft()
            batch, deadline = [first], time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                for job in [j for j in self.queue if j.key == first.key][:self.max_batch - len(batch)]:
                    self.queue.remove(job)
                    batch.append(job)
                left = deadline - time.perf_counter()
                if len(batch) >= self.max_batch or left <= 0 or self.closed:
                    break
                self.ready.wait(left)
            self.metrics.queue_length.set(len(self.queue))
        return [job for job in batch if not job.cancelled.is_set()]

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            results = self._generate(batch)
        except UserError as exc:
            if len(batch) == 1:
                batch[0].post("error", from_user_error(exc))
                self.metrics.errors.labels(code="400", type="invalid_request_error").inc()
                return
            if any(job.matcher.text for job in batch):  # text already went out: a rerun would send it twice
                for job in batch:
                    job.post("error", from_user_error(exc))
                    self.metrics.errors.labels(code="400", type="invalid_request_error").inc()
                return
            for job in batch:  # one row's input failed the whole call (say, too long with its image): alone now
                self._run([job])
            return
        for job, result in zip(batch, results):
            job.post("text", job.matcher.flush())
            job.post("done", self._outcome(job, result, len(batch)))

    def _generate(self, batch: list[Job]):
        sampling = batch[0].request.sampling
        for job in batch:
            job.tokens = 0

        def on_text(row: int, piece: str) -> None:
            text = batch[row].matcher.feed(piece)
            if text:
                batch[row].post("text", text)

        def should_stop(row: int) -> bool:
            job = batch[row]
            job.tokens += 1  # asked once after each token of a live row
            return job.cancelled.is_set() or job.matcher.stopped or job.tokens >= job.request.max_tokens

        self.metrics.batch_size.observe(len(batch))
        start = time.perf_counter()
        for job in batch:
            self.metrics.queue_seconds.observe(start - job.submitted)
        results = self.pipeline.generate(
            [job.request.image for job in batch], [job.request.prompt for job in batch],
            max_new_tokens=max(job.request.max_tokens for job in batch), do_sample=sampling.do_sample,
            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, on_text=on_text,
            should_stop=should_stop,
        )
        self.metrics.observe_timings(results[0].timings)
        return results

    def _outcome(self, job: Job, result, batch_size: int) -> dict:
        """What the handler needs to answer: text, finish reason in OpenAI's terms, usage, extras."""
        if job.matcher.stopped or result.finish_reason == "eos":
            reason = "stop"
        else:  # "length", "max_seq_len", or "stopped" at this row's own max_tokens
            reason = "length"
        kept = result.kept_indices
        return {
            "text": job.matcher.text if job.matcher.stopped else result.text,
            "finish_reason": reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids),
            "extras": {
                "kept_tokens": int(kept.size),
                "kept_indices": kept.tolist(),
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
                "batch_size": batch_size,
                "replica": os.getpid(),  # the serving process (one per Ray Serve replica)
                "queue_s": time.perf_counter() - job.submitted - result.timings.total,
                "timings": result.timings.as_dict(),
            },
        }

"""Prometheus metrics of one server (prometheus_client, one registry per app): GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
STAGES = ("preprocess", "vision", "projector", "prefill", "decode", "total")  # one observation per batch each
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prunevlm_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.errors = Counter("prunevlm_errors", "requests answered with an error", ["code", "type"], registry=r)
        self.queue_length = Gauge("prunevlm_queue_length", "requests waiting for the pipeline", registry=r)
        self.batch_size = Histogram("prunevlm_batch_size", "requests per pipeline call", buckets=BATCH_SIZES, registry=r)
        self.queue_seconds = Histogram("prunevlm_queue_seconds", "time from a request's arrival to its batch's start",
                                       buckets=SECONDS, registry=r)
        self.request_seconds = Histogram("prunevlm_request_seconds", "time from a chat request's arrival to its last byte",
                                         buckets=SECONDS, registry=r)
        self.stage_seconds = Histogram("prunevlm_stage_seconds", "pipeline stage time per batch", ["stage"],
                                       buckets=SECONDS, registry=r)
        self.prompt_tokens = Counter("prunevlm_prompt_tokens", "prompt tokens, kept visual tokens included", registry=r)
        self.completion_tokens = Counter("prunevlm_completion_tokens", "generated tokens", registry=r)

    def observe_timings(self, timings) -> None:
        """runtime.pipeline.Timings of one batch -> the per-stage histograms."""
        for stage, seconds in (("preprocess", timings.preprocess), ("vision", timings.vision),
                               ("projector", timings.projector), ("prefill", timings.prefill),
                               ("decode", sum(timings.decode_steps)), ("total", timings.total)):
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

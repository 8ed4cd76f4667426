"""The OpenAI-compatible HTTP app (Starlette): /v1/chat/completions, /v1/models, /health, /metrics.

    POST /v1/chat/completions --auth, body <= max_body_bytes, JSON, protocol.parse_chat (image decoded in a
    thread), prompt checked by Pipeline.prompt_ids--> batcher.Job --> JSON answer, or server-sent events

Every refusal is OpenAI's error object with its status (protocol.ApiError); nothing a client sends reaches
the worker thread unchecked, and an unexpected exception is a 500 for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from contract.errors import UserError
from runtime.serve import protocol
from runtime.serve.batcher import Batcher, Job
from runtime.serve.metrics import CONTENT_TYPE, Metrics
from runtime.serve.options import ServeOptions
from runtime.serve.protocol import ApiError


def build_app(options: ServeOptions) -> Starlette:
    """Load the export named by options and return its app (what each Ray Serve replica calls)."""
    from runtime.pipeline import Pipeline

    return create_app(options, Pipeline.load(options.export_dir, threads=options.threads), owns_pipeline=True)


def create_app(options: ServeOptions, pipeline, owns_pipeline: bool = False) -> Starlette:
    """The app around an already loaded Pipeline; its batcher thread starts here and stops with the app (which
    then also closes the pipeline when it loaded it: owns_pipeline)."""
    metrics = Metrics()
    batcher = Batcher(pipeline, options.max_batch, options.max_wait_ms, options.max_queue, metrics)
    server = _Server(options, pipeline, metrics, batcher)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(batcher.close)
        if owns_pipeline and not batcher.worker.is_alive():  # a batch still running keeps it
            pipeline.close()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = ApiError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}", code=code)
        metrics.errors.labels(code=str(error.status), type=error.type).inc()
        return JSONResponse(error.body(), status_code=error.status)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.exposition, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.server = server  # tests and the bench read server.batcher / server.metrics
    return app


def _endpoint(name: str):
    """Count the request; turn an ApiError (or a bug) into OpenAI's error JSON for this request only."""

    def wrap(handler):
        @functools.wraps(handler)
        async def run(self: _Server, request: Request) -> Response:
            try:
                if name != "health":
                    self.authorize(request)
                response = await handler(self, request)
            except ApiError as error:
                response = JSONResponse(error.body(), status_code=error.status)
                self.metrics.errors.labels(code=str(error.status), type=error.type).inc()
            except Exception as exc:  # a bug: this request gets a 500, the server goes on
                error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
                response = JSONResponse(error.body(), status_code=500)
                self.metrics.errors.labels(code="500", type=error.type).inc()
            self.metrics.requests.labels(endpoint=name, code=str(response.status_code)).inc()
            return response

        return run

    return wrap


class _Server:
    def __init__(self, options: ServeOptions, pipeline, metrics: Metrics, batcher: Batcher):
        self.options, self.pipeline, self.metrics, self.batcher = options, pipeline, metrics, batcher
        self.model = options.served_name
        self.key = options.api_key.encode() if options.api_key else None
        manifest = pipeline.manifest
        self.max_seq_len = manifest.llm.max_seq_len
        self.min_visual_tokens = manifest.method.keep  # per sub-image: a lower bound on any item's tokens

    def authorize(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    @_endpoint("health")
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model, "queue_length": len(self.batcher.queue)})

    @_endpoint("models")
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "prunevlm"}]})

    @_endpoint("metrics")
    async def exposition(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    @_endpoint("chat")
    async def chat(self, request: Request) -> Response:
        start = time.perf_counter()
        body = await self._body(request)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        options = self.options
        chat = await run_in_threadpool(
            protocol.parse_chat, payload, model=self.model, max_tokens_limit=self.max_seq_len,
            default_max_tokens=options.default_max_tokens, max_image_bytes=options.max_image_bytes,
            allow_image_dir=options.allow_image_dir)
        try:
            ids = await run_in_threadpool(self.pipeline.prompt_ids, chat.prompt)
        except UserError as exc:
            raise protocol.from_user_error(exc, param="messages") from None
        if len(ids) - 1 + self.min_visual_tokens >= self.max_seq_len:
            raise ApiError(400, f"the prompt takes {len(ids) - 1 + self.min_visual_tokens} tokens with the image; this "
                           f"export handles at most {self.max_seq_len - 1}: shorten the prompt", param="messages",
                           code="context_length_exceeded")
        job = Job(chat, asyncio.get_running_loop())
        self.batcher.submit(job)
        if chat.stream:
            return StreamingResponse(self._events(job, start), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outcome = await self._outcome(job, request)
        self._count(outcome, start)
        return JSONResponse(protocol.completion(chat, self.model, outcome["text"], outcome["finish_reason"],
                                                protocol.usage(outcome["prompt_tokens"], outcome["completion_tokens"]),
                                                outcome["extras"]))

    async def _body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes, over this server's limit of {limit}",
                           code="request_too_large")
        pieces, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                               code="request_too_large")
            pieces.append(piece)
        return b"".join(pieces)

    async def _outcome(self, job: Job, request: Request) -> dict:
        """Wait for the job's result; a client that disconnects meanwhile cancels its row."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    job.cancel()
                    raise ApiError(499, "the client closed the connection", code="client_closed")
                kind, value = event.result()
                if kind == "error":
                    raise value
                if kind == "done":
                    return value
        finally:
            gone.cancel()

    async def _events(self, job: Job, start: float):
        """Server-sent events: a role chunk, text chunks, a last chunk with finish_reason and the extras,
        `usage` in one more chunk when stream_options.include_usage, then [DONE]."""
        chat = job.request
        try:
            yield _sse(protocol.chunk(chat, self.model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    if value:
                        yield _sse(protocol.chunk(chat, self.model, {"content": value}))
                elif kind == "error":
                    self.metrics.errors.labels(code=str(value.status), type=value.type).inc()
                    yield _sse(value.body())
                    break
                else:
                    self._count(value, start)
                    yield _sse(protocol.chunk(chat, self.model, {}, value["finish_reason"], prunevlm=value["extras"]))
                    if chat.include_usage:
                        yield _sse({**protocol.chunk(chat, self.model, {}), "choices": [],
                                    "usage": protocol.usage(value["prompt_tokens"], value["completion_tokens"])})
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away mid-stream (or the answer is complete: then a no-op)

    def _count(self, outcome: dict, start: float) -> None:
        self.metrics.request_seconds.observe(time.perf_counter() - start)
        self.metrics.prompt_tokens.inc(outcome["prompt_tokens"])
        self.metrics.completion_tokens.inc(outcome["completion_tokens"])


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

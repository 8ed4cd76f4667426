"""python -m runtime.serve EXPORT_DIR: an OpenAI-compatible HTTP server for an export, with dynamic batching.

    options.py   ServeOptions: one frozen dataclass, one field per flag
    protocol.py  the chat-completions request checked field by field, errors, response bodies (no ASGI stack)
    batcher.py   dynamic batching in one worker thread in front of the Pipeline
    metrics.py   Prometheus metrics (prometheus_client)
    app.py       the Starlette app (pip install prunevlm[serve])
    ray_app.py   the same app as a Ray Serve deployment with N replicas (pip install prunevlm[ray])

Nothing here is imported by `runtime` itself: the runtime core needs neither Starlette nor Ray.
"""

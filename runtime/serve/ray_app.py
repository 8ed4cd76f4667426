"""The same Starlette app as a Ray Serve deployment: N replicas, each loading the export once, behind Ray's
HTTP proxy (which binds options.host:options.port). `pip install prunevlm[ray]`.

    client --HTTP--> Ray proxy (host:port) --round robin--> replica 1..N: build_app(options) (own Pipeline,
    own batcher) --> the same OpenAI API
"""

from __future__ import annotations

import os
from pathlib import Path

from contract.errors import UserError
from runtime.serve.options import ServeOptions

APP_NAME = "prunevlm"


def deployment(options: ServeOptions):
    """A bound Ray Serve application of options.replicas replicas (each replica builds its own app)."""
    from ray import serve

    from runtime.serve.app import build_app

    replica = serve.ingress(lambda: build_app(options))()  # the builder runs on each replica
    # One replica takes at most max_queue requests in flight; beyond that Ray's proxy holds them back.
    return serve.deployment(replica, name="prunevlm", num_replicas=options.replicas,
                            max_ongoing_requests=options.max_queue).bind()


def start(options: ServeOptions, *, blocking: bool = True):
    """Start (or join) a local Ray cluster, the HTTP proxy on options.host:options.port, and the deployment."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'prunevlm[ray]'") from None
    if not ray.is_initialized():
        # No usage reports sent out of the machine; the cluster's own services on loopback (a multi-node
        # cluster is joined with RAY_ADDRESS instead, and its addresses are its own).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Replicas import this checkout's packages, whatever else the workers' Python has installed.
        root = str(Path(__file__).resolve().parents[2])
        local = {} if os.environ.get("RAY_ADDRESS") else {"_node_ip_address": "127.0.0.1"}
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root}}, **local)
    serve.start(http_options={"host": options.host, "port": options.port})
    return serve.run(deployment(options), name=APP_NAME, route_prefix="/", blocking=blocking)


def stop() -> None:
    from ray import serve

    serve.shutdown()

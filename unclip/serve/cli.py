"""`unclip serve`: load a model once, warm it up, and serve it over HTTP (docs/serving.md)."""

from __future__ import annotations

import logging
import os
import socket
import sys

import click

from unclip.errors import UnclipError
from unclip.models import DEFAULT_MODEL

# Behind Ray's proxy a wave of requests reaches the replica spread over more than 10 ms: 8 closed-
# loop clients made batches of 4, not 8, and 0.84x the plain server's images/s (measured, demo, CPU)
RAY_MAX_WAIT_MS = 50.0


@click.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="demo, a checkpoint folder, an export folder (with --backend onnxruntime) or a preset")
@click.option("--backend", default="torch", show_default=True, help="torch, onnxruntime or tensorrt")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, or fp16/bf16 (torch backend)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0 exposes the server to the network)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch-images", type=click.IntRange(1), default=8, show_default=True,
              help="images per batch (compatible requests are merged up to this)")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=None,
              help="how long the oldest queued request waits for others to fill its batch  "
              "[default: 10; with --ray 50, as requests reach a replica through Ray's proxy spread out]")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="queued requests beyond this get 429 with Retry-After")
@click.option("--timeout-s", type=click.FloatRange(0, min_open=True), default=None,
              help="per-request deadline; past it the request leaves its batch and gets 504  [default: none]")
@click.option("--drain-s", type=click.FloatRange(0), default=30.0, show_default=True,
              help="on SIGTERM, how long queued and running requests may finish before the server exits")
@click.option("--max-body-bytes", type=click.IntRange(256), default=65536, show_default=True)
@click.option("--replica", default=None, help="this server's name in headers, logs and metrics "
              "[default: HOST-PID; with --ray, Ray's replica id]")
@click.option("--ray", "use_ray", is_flag=True,
              help="serve through Ray Serve on a local Ray instance: replicas behind one endpoint, each "
              "with its own engine (docs/ray.md); --max-queue is then the requests waiting for a replica")
@click.option("--replicas", type=click.IntRange(1), default=None, help="with --ray: replicas  [default: 1]")
@click.option("--max-ongoing-requests", type=click.IntRange(1), default=None,
              help="with --ray: requests one replica holds at once  [default: 2 x --max-batch-images]")
def serve(model: str, backend: str, device: str, dtype: str, host: str, port: int, max_batch_images: int,
          max_wait_ms: float | None, max_queue: int, timeout_s: float | None, drain_s: float,
          max_body_bytes: int,
          replica: str | None, use_ray: bool, replicas: int | None, max_ongoing_requests: int | None) -> None:
    """Serve a model over HTTP: OpenAI's POST /v1/images/generations, /health/live, /health/ready,
    /metrics. One JSON log line per request on stderr."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UnclipError(f"unclip serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'unclip[serve]'") from None
    if use_ray:
        if replica is not None:
            raise UnclipError("--replica is Ray's replica id under --ray; leave it out")
        return _serve_on_ray(model, backend, device, dtype, host, port, max_batch_images,
                             RAY_MAX_WAIT_MS if max_wait_ms is None else max_wait_ms,
                             max_queue, timeout_s, drain_s, max_body_bytes, replicas or 1,
                             max_ongoing_requests or 2 * max_batch_images)
    if replicas is not None or max_ongoing_requests is not None:
        raise UnclipError("--replicas and --max-ongoing-requests are Ray Serve settings; add --ray")
    max_wait_ms = 10.0 if max_wait_ms is None else max_wait_ms
    import unclip
    from unclip.serve.api import ServeState
    from unclip.serve.engine import Engine
    from unclip.serve.metrics import Metrics
    from unclip.serve.server import run_server

    replica = replica or f"{socket.gethostname()}-{os.getpid()}"
    # loaded on the engine's scheduler thread, the one that computes (Engine.__init__ says why)
    engine = Engine(lambda: unclip.load(model, backend=backend, device=device, dtype=dtype),
                    max_batch_images=max_batch_images, max_wait_ms=max_wait_ms, max_queue=max_queue,
                    metrics=Metrics(labels={"replica": replica}))
    pipe = engine.wait_loaded()
    state = ServeState(engine, model=str(model), image_size=pipe.dims.super_res_size, replica=replica,
                       timeout_s=timeout_s, max_body_bytes=max_body_bytes)
    log_to_stderr()
    click.echo(f"unclip: serving {model} on http://{host}:{port} (replica {replica})", err=True)
    run_server(state, host, port, drain_s)


def _serve_on_ray(model: str, backend: str, device: str, dtype: str, host: str, port: int,
                  max_batch_images: int, max_wait_ms: float, max_queue: int, timeout_s: float | None,
                  drain_s: float, max_body_bytes: int, replicas: int, max_ongoing_requests: int) -> None:
    from unclip.serve.ray_proxy import CALLBACK

    # read by Ray when it is first imported, here and in the processes it starts
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", CALLBACK)  # envelopes on Ray's errors
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine node: all on 127.0.0.1
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise UnclipError(f"unclip serve --ray needs Ray Serve ({exc.name} is missing): "
                          "pip install 'unclip[ray]'") from None
    from unclip.models import resolve_model_path
    from unclip.models.presets import PRESETS
    from unclip.serve.ray_app import UnclipArgs, run_local

    if model not in PRESETS and "{gpu}" not in model:
        resolve_model_path(model)  # the replicas load it here: a wrong path fails before Ray starts
    # the engine holds every request Ray lets through to its replica; Ray queues the rest
    args = UnclipArgs(model=model, backend=backend, device=device, dtype=dtype,
                      max_batch_images=max_batch_images, max_wait_ms=max_wait_ms,
                      max_queue=max_ongoing_requests, timeout_s=timeout_s, max_body_bytes=max_body_bytes)
    log_to_stderr()
    run_local(args, host=host, port=port, replicas=replicas, max_ongoing_requests=max_ongoing_requests,
              max_queued_requests=max_queue, drain_s=drain_s)


def log_to_stderr() -> None:
    """Access lines are JSON objects as they are; the engine's own notes get a prefix."""
    for name, fmt in (("unclip.serve.access", "%(message)s"), ("unclip.serve", "unclip: %(message)s")):
        logger = logging.getLogger(name)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False

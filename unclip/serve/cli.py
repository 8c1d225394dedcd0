"""`unclip serve`: load a model once, warm it up, and serve it over HTTP (docs/serving.md).

Its options are unclip.options.ServeOptions, declared once with the Ray app's and generate's."""

from __future__ import annotations

import logging
import os
import socket
import sys

import click

from unclip.errors import UnclipError
from unclip.options import ServeOptions, click_options, from_cli

# Behind Ray's proxy a wave of requests reaches the replica spread over more than 10 ms: 8 closed-
# loop clients made batches of 4, not 8, and 0.84x the plain server's images/s (measured, demo, CPU)
RAY_MAX_WAIT_MS = 50.0
MAX_WAIT_MS = 10.0


FIRST = ("model", "backend", "device", "dtype", "cuda_graphs", "kernels", "step_cache", "allow_pickle",
         "served_model_name", "host", "port", "api_key", "api_key_file", "allow_unauthenticated",
         "metrics_port")  # then the rest


@click.command()
@click_options(ServeOptions, *FIRST, *(f for f in ServeOptions.model_fields if f not in FIRST))
def serve(**values) -> None:
    """Serve a model over HTTP with OpenAI's images API: POST /v1/images/generations (JSON) and
    POST /v1/images/variations (a multipart form with the image), GET /health/live, /health/ready
    and /metrics. One JSON log line per request on stderr. Limits, keys and timeouts:
    docs/serving.md; what to put in front of it: docs/security.md."""
    options = from_cli(ServeOptions, values).check()
    check_serve_dependencies()
    if options.ray:
        return _serve_on_ray(options)
    import unclip
    from unclip.serve.api import ServeState
    from unclip.serve.engine import output_size
    from unclip.serve.metrics import Metrics
    from unclip.serve.server import run_server

    replica = options.replica or f"{socket.gethostname()}-{os.getpid()}"
    engine = engine_for(options, lambda: unclip.load(**options.load_kwargs(), limits=limits_for(options)),
                        Metrics(labels={"replica": replica}), MAX_WAIT_MS)
    pipe = engine.wait_loaded()
    state = ServeState.from_options(engine, options.replica_options(), output_size(pipe), replica)
    log_to_stderr()
    keys = ("API key required" if state.key_digests
            else "no API key (loopback only, or --allow-unauthenticated)")
    click.echo(f"unclip: serving {state.model} on http://{options.host}:{options.port} (replica {replica}; "
               f"{keys})", err=True)
    run_server(state, options)


def limits_for(options):
    """The caps a replica puts on one request (unclip.Limits, checked by the pipeline: a 400 naming
    the field)."""
    from unclip.engine.settings import Limits

    return Limits(max_images=options.max_images_per_request, max_steps=options.max_steps,
                  max_guidance=options.max_guidance, max_image_pixels=options.max_image_pixels)


def engine_for(options, loader, metrics, default_wait_ms: float):
    """The replica's engine; the model loaded on its scheduler thread, the one that computes
    (Engine.__init__ says why)."""
    from unclip.serve.engine import Engine

    return Engine(loader, max_batch_images=options.max_batch_images,
                  max_wait_ms=default_wait_ms if options.max_wait_ms is None else options.max_wait_ms,
                  max_queue=options.max_queue, metrics=metrics, decode_workers=options.decode_workers,
                  unhealthy_after_failures=options.unhealthy_after_failures, stall_s=options.stall_s)


# (module, package): what the routes import; the serve and ray extras declare every package
# (tests/test_serve_security.py), so that a fresh `pip install "unclip[serve]"` serves every route
SERVE_DEPENDENCIES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                      ("prometheus_client", "prometheus-client"), ("python_multipart", "python-multipart"))


def check_serve_dependencies() -> None:
    """What the routes need, checked at start: a missing one is the operator's to fix, not a 4xx for
    every client later (python-multipart: the variations route's forms)."""
    missing = []
    for module, package in SERVE_DEPENDENCIES:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UnclipError(f"unclip serve needs the serve extra ({', '.join(missing)} missing): "
                          "pip install 'unclip[serve]'")


def _serve_on_ray(options: ServeOptions) -> None:
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
    from unclip.models.stable_unclip import STABLE_PRESETS
    from unclip.serve.ray_app import run_local

    if options.model not in PRESETS and options.model not in STABLE_PRESETS and "{gpu}" not in options.model:
        resolve_model_path(options.model)  # the replicas load it here: a wrong path fails before Ray starts
    max_ongoing = options.max_ongoing_requests or 2 * options.max_batch_images
    # the engine holds every request Ray lets through to its replica; Ray queues the rest
    args = options.replica_options(max_queue=max_ongoing, max_wait_ms=RAY_MAX_WAIT_MS
                                   if options.max_wait_ms is None else options.max_wait_ms)
    log_to_stderr()
    run_local(args, host=options.host, port=options.port, replicas=options.replicas or 1,
              max_ongoing_requests=max_ongoing, max_queued_requests=options.max_queue,
              drain_s=options.drain_s, allow_unauthenticated=options.allow_ray_unauthenticated)


def log_to_stderr() -> None:
    """Access lines are JSON objects as they are; the engine's own notes get a prefix."""
    for name, fmt in (("unclip.serve.access", "%(message)s"), ("unclip.serve", "unclip: %(message)s")):
        logger = logging.getLogger(name)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False

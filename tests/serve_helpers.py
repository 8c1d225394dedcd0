"""A real uvicorn server on 127.0.0.1 in a background thread, for the HTTP tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

START_TIMEOUT = 60  # seconds to wait for the server to listen and warm up
GATE_WAIT = 120  # seconds a gated batch waits for its test (not reached when the test works)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STATE_OPTIONS = ("timeout_s", "max_body_bytes", "max_upload_bytes", "key_digests", "receive_timeout_s",
                 "limit_concurrency", "max_header_bytes")
SERVER_OPTIONS = ("receive_timeout_s", "keep_alive_s", "max_header_bytes", "limit_concurrency")


@contextmanager
def running_server(pipeline, *, model: str = "tiny", warmup: bool = False, **engine_options) -> Iterator:
    """Yields (base_url, state): the server `unclip serve` runs (its uvicorn settings included).
    The engine's options (max_batch_images, ...) as keywords, plus the state's (STATE_OPTIONS) and
    the connection settings (SERVER_OPTIONS)."""
    import uvicorn

    from unclip.serve.api import ServeState
    from unclip.serve.engine import Engine, output_size
    from unclip.serve.metrics import Metrics
    from unclip.serve.server import create_app, uvicorn_config

    server_options = {k: engine_options[k] for k in SERVER_OPTIONS if k in engine_options}
    state_options = {k: engine_options[k] for k in STATE_OPTIONS if k in engine_options}
    for k in {*SERVER_OPTIONS, *STATE_OPTIONS}:
        engine_options.pop(k, None)
    engine = Engine(pipeline, **{"max_batch_images": 8, "max_wait_ms": 10, "max_queue": 16,
                                 "metrics": Metrics(labels={"replica": "test-replica"}), **engine_options})
    state = ServeState(engine, model=model, image_size=output_size(pipeline), replica="test-replica",
                       **state_options)
    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(state, warmup=warmup), "127.0.0.1", port,
                                           log_level="warning", **server_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + START_TIMEOUT
    while not (server.started and state.ready):
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        engine.shutdown(0)
        server.should_exit = True
        thread.join(30)


class Gate:
    """A real pipeline whose batches wait until the gate opens: a running batch the tests control."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.open = threading.Event()
        self.entered = threading.Event()
        self.fail = 0  # the next batches that raise, as a broken device would

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate_requests(self, requests, **kw):
        self.entered.set()
        if not self.open.wait(GATE_WAIT):
            raise RuntimeError("the test never opened the gate")
        if self.fail:
            self.fail -= 1
            raise RuntimeError("CUDA error: an illegal memory access at /opt/secret/path.cu:42")
        return self._pipeline.generate_requests(requests, **kw)

"""A real uvicorn server on 127.0.0.1 in a background thread, for the HTTP tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

START_TIMEOUT = 60  # seconds to wait for the server to listen and warm up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(pipeline, *, model: str = "tiny", warmup: bool = False, **engine_options) -> Iterator:
    """Yields (base_url, state); the engine's options (max_batch_images, ...) as keywords, plus
    `timeout_s`, `max_body_bytes` and `max_upload_bytes` for the state."""
    import uvicorn

    from unclip.serve.api import ServeState
    from unclip.serve.engine import Engine
    from unclip.serve.metrics import Metrics
    from unclip.serve.server import create_app

    state_options = {k: engine_options.pop(k) for k in ("timeout_s", "max_body_bytes", "max_upload_bytes")
                     if k in engine_options}
    engine = Engine(pipeline, **{"max_batch_images": 8, "max_wait_ms": 10, "max_queue": 16,
                                 "metrics": Metrics(labels={"replica": "test-replica"}), **engine_options})
    state = ServeState(engine, model=model, image_size=pipeline.dims.super_res_size, replica="test-replica",
                       **state_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state, warmup=warmup), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
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

"""`unclip serve`: the routes of api.py in a FastAPI app under uvicorn, with a draining SIGTERM.

The app adds what every response needs around the routes: a request id and the replica's
identity as headers, one JSON log line per request, HTTP metrics, and OpenAI's error envelope
for 404/405 and for anything unexpected (never a traceback in a body).

SIGTERM (what an orchestrator sends): readiness turns 503 and new requests get 503 at once;
queued and running requests finish, for up to `drain_s` seconds; then uvicorn stops and the
process exits 0. A second SIGTERM or Ctrl-C stops at once.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from unclip.serve.api import ServeState, router
from unclip.serve.envelope import ApiError, envelope

access_log = logging.getLogger("unclip.serve.access")
log = logging.getLogger("unclip.serve")
ROUTES = {route.path for route in router.routes}


def create_app(state: ServeState, *, warmup: bool = True) -> FastAPI:
    """An app serving `state.engine`; with `warmup`, readiness waits for one warm-up request,
    run in the background so that liveness answers while it runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warmup:
            threading.Thread(target=_warm_up, args=(state,), name="unclip-warmup", daemon=True).start()
        else:
            state.ready = True
        yield

    app = FastAPI(title="unclip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.unclip = state
    app.include_router(router)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}; see POST /v1/images/generations"
        return envelope(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return envelope(ApiError(500, f"internal error ({type(exc).__name__}); it is logged on the server",
                                 type="server_error", code="internal_error"))

    app.add_middleware(AccessLog, state=state)
    return app


def warm_up(state: ServeState) -> None:
    """Run one request through the engine, then take the model's objects out of the collector and
    mark the server ready. The model's Python objects (~0.5 M for the demo) live as long as the
    process; left to the collector, every full pass walks them all holding the GIL: 0.5 s on the
    shared 2-core machine, during which the event loop answers nothing (a 429 took 280 ms)."""
    state.engine.warmup()
    gc.collect()
    gc.freeze()
    state.ready = True


def _warm_up(state: ServeState) -> None:
    try:
        warm_up(state)
        log.info("ready: model %s warmed up", state.model)
    except Exception:  # noqa: BLE001 - a failed warm-up leaves the replica unready, visibly
        log.exception("warm-up failed; /health/ready stays 503")


class AccessLog:
    """ASGI middleware: request id and replica headers, one JSON log line and HTTP metrics per request.
    The request id is the caller's X-Request-Id where it sent one (not echoed), else a new one."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # a proxy in front (Ray Serve's, a gateway) names the request and returns the id itself
        given = Headers(scope=scope).get("x-request-id", "")[:128]
        start, request_id, status = time.perf_counter(), given or uuid.uuid4().hex[:16], {"code": 500}
        scope.setdefault("state", {})

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = MutableHeaders(scope=message)
                if not given:
                    headers["X-Request-Id"] = request_id
                headers["X-Unclip-Replica"] = self.state.replica
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - start
            route = scope["path"] if scope["path"] in ROUTES else "other"
            metrics = self.state.engine.metrics
            metrics(metrics.http_requests, route=route, code=str(status["code"])).inc()
            metrics(metrics.http_seconds, route=route).observe(seconds)
            if route != "/metrics" and not route.startswith("/health"):
                line = {"ts": round(time.time(), 3), "request_id": request_id, "replica": self.state.replica,
                        "method": scope["method"], "path": scope["path"], "status": status["code"],
                        "seconds": round(seconds, 4), **scope["state"].get("log", {})}
                access_log.info(json.dumps(line))


def run_server(state: ServeState, host: str, port: int, drain_s: float, log_level: str = "info") -> None:
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, state, drain_s).run()


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: drain the engine, then exit; a second one: uvicorn's own handling."""

    def __init__(self, config: uvicorn.Config, state: ServeState, drain_s: float):
        super().__init__(config)
        self.unclip, self.drain_s, self.draining = state, drain_s, False

    def handle_exit(self, sig, frame) -> None:
        if self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        log.info("signal %s: draining for up to %.0f s", sig, self.drain_s)
        threading.Thread(target=self._drain, name="unclip-drain", daemon=True).start()

    def _drain(self) -> None:
        self.unclip.engine.shutdown(self.drain_s)  # readiness is 503 from here on (engine.accepting)
        log.info("drained; stopping")
        self.should_exit = True

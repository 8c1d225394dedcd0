"""`unclip serve`: the routes of api.py in a FastAPI app under uvicorn, with a draining SIGTERM.

The app adds what every response needs around the routes: a request id and the replica's
identity as headers, one JSON log line per request, HTTP metrics, and OpenAI's error envelope
for 404/405 and for anything unexpected (never a traceback or the server's internals in a body).
Around it, outermost first: the access log, API keys (`Authorization: Bearer KEY`; 401), the
limit on requests in progress (503). Under it, uvicorn's h11 protocol with what uvicorn lacks: a
deadline for a request's headers (408, then the connection is closed) and an envelope for a
request that is not HTTP; plus uvicorn's keep-alive timeout, header size limit and a connection cap.

SIGTERM (what an orchestrator sends): readiness turns 503 and new requests get 503 at once;
queued and running requests finish, for up to `drain_s` seconds; then uvicorn stops and the
process exits 0. A second SIGTERM or Ctrl-C stops at once.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

import h11
import uvicorn
from fastapi import FastAPI, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from unclip.options import digest
from unclip.serve.api import PLAYGROUND, ServeState, router
from unclip.serve.envelope import ApiError, envelope

access_log = logging.getLogger("unclip.serve.access")
log = logging.getLogger("unclip.serve")
ROUTES = {route.path for route in router.routes}
OPEN_PATHS = ("/health/live", "/health/ready")  # what needs no key, and is never refused as busy
PUBLIC_PATHS = (*OPEN_PATHS, *PLAYGROUND)  # what needs no key: health and the playground's static files


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
        request_id = getattr(request.state, "request_id", "")
        log.exception("request %s: unexpected error on %s %s", request_id, request.method, request.url.path)
        return envelope(ApiError(500, f"internal error (request id {request_id}; the details are in the "
                                 "server's log)", type="server_error", code="internal_error"))

    # the last added runs first: the access log sees every answer, keys are checked before a request
    # takes one of the places in progress
    app.add_middleware(ConcurrencyLimit, state=state)
    app.add_middleware(ApiKeyAuth, state=state)
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
        scope.setdefault("state", {})["request_id"] = request_id

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


class ApiKeyAuth:
    """ASGI middleware: with keys configured, every path but health and the playground's page needs
    `Authorization: Bearer KEY` (401 with OpenAI's `invalid_api_key` otherwise). Keys are kept as
    SHA-256 digests and compared in constant time, each one, whether or not an earlier one matched."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        digests = self.state.key_digests
        if scope["type"] != "http" or not digests or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        given = digest(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        matches = [hmac.compare_digest(given, d) for d in digests]
        if any(matches):
            return await self.app(scope, receive, send)
        scope.setdefault("state", {}).setdefault("log", {})["error"] = "invalid_api_key"
        message = ("an API key is required: send `Authorization: Bearer KEY`" if not given
                   else "the API key is not accepted by this server; check the key you send")
        await envelope(ApiError(401, message, code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"}))(scope, receive, send)


class ConcurrencyLimit:
    """ASGI middleware: a request line and headers of at most `state.max_header_bytes` (431; uvicorn's
    h11 limit holds only while they are incomplete), and at most `state.limit_concurrency` requests
    in progress (health checks are not counted, so that liveness answers however busy the server is);
    beyond, 503 with Retry-After. One event loop runs every request: a plain counter is enough."""

    def __init__(self, app, state: ServeState):
        self.app, self.state, self.active = app, state, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        if size > self.state.max_header_bytes:
            scope.setdefault("state", {}).setdefault("log", {})["error"] = "headers_too_large"
            error = ApiError(431, f"the request line and headers are {size} bytes, above this server's "
                             f"limit of {self.state.max_header_bytes}; send fewer or shorter headers",
                             code="headers_too_large", headers={"Connection": "close"})
            return await envelope(error)(scope, receive, send)
        if scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.state.limit_concurrency:
            scope.setdefault("state", {}).setdefault("log", {})["error"] = "concurrency_limit"
            error = ApiError(503, f"the server has {self.state.limit_concurrency} requests in progress, its "
                             "limit; retry shortly", type="server_error", code="concurrency_limit",
                             headers={"Retry-After": "1"})
            return await envelope(error)(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's line and headers: a client that sends
    them slower than `receive_timeout_s` (a slow-headers attack holds a connection for ever otherwise)
    gets 408 and the connection is closed. The body's own deadline is the app's (api.read_body). A
    request that is not HTTP gets OpenAI's envelope instead of uvicorn's plain text."""

    receive_timeout_s = 30.0  # set per server by uvicorn_config
    _deadline: object = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on this connection gets the same deadline

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.receive_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._send_error(408, "Request Timeout", f"the request's headers did not arrive within "
                         f"{self.receive_timeout_s:g} s; send them at once", "receive_timeout")

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, "Bad Request", f"the request is not valid HTTP ({msg.rstrip('.')}); check the "
                         "request line and headers (their size is limited)", "invalid_http")

    def _send_error(self, status: int, reason: str, message: str, code: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)  # raw: whatever state h11 is in, the connection ends here
        self.transport.close()


def uvicorn_config(app, host: str, port: int, *, receive_timeout_s: float = 30.0, keep_alive_s: float = 5.0,
                   max_header_bytes: int = 16384, limit_concurrency: int = 64,
                   log_level: str = "info") -> uvicorn.Config:
    """The server's uvicorn settings (`unclip serve` and the tests share them). uvicorn's own
    concurrency limit is a cap on connections above the app's limit on requests (ConcurrencyLimit
    answers 503 with an envelope; uvicorn past its cap only with plain text)."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"receive_timeout_s": receive_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=5, http=protocol, timeout_keep_alive=keep_alive_s,
                          h11_max_incomplete_event_size=max_header_bytes,
                          limit_concurrency=2 * limit_concurrency + 64)


def run_server(state: ServeState, options, log_level: str = "info") -> None:
    """`unclip serve`'s server for unclip.options.ServeOptions, until SIGTERM (drained) or Ctrl-C."""
    if options.metrics_port is not None:  # for a scraper, without a key: prometheus_client's own server
        from prometheus_client import start_http_server

        start_http_server(options.metrics_port, addr=options.host, registry=state.engine.metrics.registry)
    config = uvicorn_config(create_app(state), options.host, options.port,
                            receive_timeout_s=options.receive_timeout_s, keep_alive_s=options.keep_alive_s,
                            max_header_bytes=options.max_header_bytes,
                            limit_concurrency=options.limit_concurrency, log_level=log_level)
    DrainingServer(config, state, options.drain_s).run()


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

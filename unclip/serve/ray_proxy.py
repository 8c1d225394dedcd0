"""Ray Serve's HTTP proxy answers some requests itself: a replica died under the request (500),
the deployment's queue is full (503, or 429 where configured), the proxy's timeout passed (408),
no application is deployed at the path (404: while it starts or is being deleted). Its bodies are
plain text; this middleware gives them OpenAI's error envelope, as every answer of the replicas
has, so that a client reads one error format whoever answered. The 404 becomes a 503 with
Retry-After: the whole path space belongs to unclip's application (route prefix /), whose own 404s
are envelopes, so Ray's 404 means "not deployed right now", which a client should retry.

Ray loads it in each proxy from the environment of `ray start` (or of the driver that starts a
local Ray): RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=unclip.serve.ray_proxy:middlewares.
Without it, the statuses are the same and only the bodies are Ray's text.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware import Middleware

from unclip.serve.envelope import ApiError, envelope

CALLBACK = "unclip.serve.ray_proxy:middlewares"  # the value of the variable above

# Ray's own error statuses -> (status sent, OpenAI error type, code, what the client can do)
UNAVAILABLE = (503, "server_error", "unavailable", "no replica can take the request now (all busy with a "
               "full queue, none running, or the application starting or stopping); retry later")
RAY_ERRORS = {
    404: UNAVAILABLE,
    408: (408, "timeout_error", "proxy_timeout", "the request took longer than the proxy allows; retry"),
    429: (429, "rate_limit_error", "queue_full", "every replica is busy and the queue is full; retry later"),
    500: (500, "server_error", "replica_failed", "the replica handling the request failed; retry, another "
          "replica takes it"),
    503: UNAVAILABLE,
}
KEPT_HEADERS = ("retry-after", "x-request-id")


def middlewares() -> list[Middleware]:
    """What Ray's proxy calls at start (the callback named by CALLBACK)."""
    return [Middleware(ProxyErrorEnvelope)]


class ProxyErrorEnvelope:
    """ASGI middleware: an error response without a JSON body (Ray's, never a replica's: theirs
    are all envelopes) is replaced by an envelope, keeping Retry-After and the request id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}
        started = False

        async def send_enveloped(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = Headers(raw=message.get("headers", []))
                if message["status"] in RAY_ERRORS and "json" not in headers.get("content-type", ""):
                    held.update(status=message["status"], headers=headers, body=b"")
                    return
            elif held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    await self._send_envelope(held, scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, send_enveloped)
        if not started:  # a replica died under the request: Ray sends nothing and uvicorn a bare 500
            request_id = Headers(scope=scope).get("x-request-id")  # Ray's, added to the request
            headers = Headers({"x-request-id": request_id} if request_id else {})
            await self._send_envelope({"status": 500, "headers": headers, "body": b""}, scope, receive, send)

    @staticmethod
    async def _send_envelope(held: dict, scope, receive, send) -> None:
        status, type_, code, advice = RAY_ERRORS[held["status"]]
        said = (held["body"].decode("utf-8", "replace").strip().splitlines() or [""])[0][:200]
        headers = {k: held["headers"][k] for k in KEPT_HEADERS if k in held["headers"]}
        if status == 503:
            headers.setdefault("retry-after", "1")
        # Ray's own words for a 4xx; a 5xx says nothing of the inside (a dead replica's error is in Ray's log)
        message = f"{advice} (Ray Serve: {said})" if said and status < 500 else advice
        response = envelope(ApiError(status, message, type=type_, code=code, headers=headers))
        await response(scope, receive, send)

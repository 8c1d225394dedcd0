"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`: one definition for
the routes (api.py), the app around them (server.py) and Ray's HTTP proxy (ray_proxy.py).

Kept apart from api.py so that Ray's proxy process can use it without importing torch.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error envelope to send: HTTP status, OpenAI error type and code, the field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers


def envelope(error: ApiError) -> JSONResponse:
    body = {"error": {"message": str(error), "type": error.type, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)

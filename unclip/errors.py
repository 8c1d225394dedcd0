"""The error types users see: a message that names the bad value and the fix."""

from __future__ import annotations


class UnclipError(Exception):
    """A user-facing problem (bad input, bad model folder); the CLI prints it as one line.

    `param` names the offending argument where there is one (an API field, a CLI option without
    its dashes), so that front ends can point at it (the HTTP error envelope's `param`).
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class GenerationError(UnclipError):
    """The request was valid but generating it failed (e.g. non-finite values in half precision):
    a server answers 500 for this, 4xx for any other UnclipError."""

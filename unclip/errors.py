"""The one error type users see: a message that names the bad value and the fix."""


class UnclipError(Exception):
    """A user-facing problem (bad input, bad model folder); the CLI prints it as one line."""

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


JSON_WORDS = {"a valid dictionary": "a JSON object", "a valid list": "a JSON list",
              "a valid string": "a text", "a valid number": "a number"}  # pydantic's words -> a JSON user's


def schema_error(exc, *, where: str = "", fix: str = "", requirements: dict[str, str] | None = None,
                 unknown: str = "", data=None) -> UnclipError:
    """A schema library's error (pydantic's ValidationError) as one line: the field, the bad value,
    what it must be, the fix. `requirements` words what a field must be (else pydantic's words);
    `data`, the validated input, trims union branch names from the field's path."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = _path_in(data, first["loc"]) if data is not None else [str(p) for p in first["loc"]]
    field = ".".join(path) or "(the document)"
    name = path[-1] if path else ""
    if first["type"] == "missing":
        problem = f"{field} is missing"
    elif first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        problem = f"unknown key {name!r}" + (f"; {unknown}" if unknown else "")
    else:
        wanted = (requirements or {}).get(name)
        if wanted is not None:
            rule = f"must be {wanted}"
        else:  # pydantic's words: "Input should be a valid integer" -> "must be a valid integer"
            msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            rule = "must " + msg.split("should ", 1)[1] if "should " in msg else msg
            for python, plain in JSON_WORDS.items():
                rule = rule.replace(python, plain)
        value = repr(first.get("input"))
        problem = f"{field} {rule}, got {value if len(value) <= 80 else value[:77] + '...'}"
    more = len({tuple(_path_in(data, e["loc"]) if data is not None else e["loc"]) for e in errors}) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    tail += f"; {fix}" if fix else ""
    return UnclipError(f"{where}{problem}{tail}", param=field if path else None)


def _path_in(data, loc) -> list[str]:
    """The part of a pydantic error location that exists in `data` (drops union branch tags such as
    'int' or 'function-after[...]'), plus the name of a missing key."""
    path, node = [], data
    for part in loc:
        if isinstance(node, (dict, list)) and _has(node, part):
            node = node[part]
            path.append(str(part))
            continue
        if isinstance(node, dict) and isinstance(part, str):
            path.append(part)  # a missing key
        break
    return path


def _has(node, part) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)

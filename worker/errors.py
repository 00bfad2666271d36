"""Errors the user can fix, and the one way a validation error becomes one line.

A `UserError` carries a one-line message that names what is wrong and how to fix it. The CLI prints
it without a traceback and exits with code 2; anything else is a bug and keeps its traceback.
Every typed input (run config, suite, model config, thresholds file) is validated by pydantic where
it enters, and `one_line` turns pydantic's report into that line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from pydantic import ValidationError

UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")
BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
          "less_than": ("<", "lt")}


class UserError(ValueError):
    """Bad input: a missing file, an invalid value, a pack that does not match its manifest."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def one_line(e: ValidationError, leaf: bool = False,
             allowed: Callable[[tuple], Iterable[str]] | None = None) -> str:
    """The first error as `key: what is wrong (got value)`; an unknown key (a typo explains the rest)
    comes first and lists the allowed keys when `allowed(loc)` can say them. `leaf` names a value by
    its last key only (run-config leaf names are unique); a check of several fields (a ValueError in
    `__post_init__`) already names its fields and is kept as written."""
    errors = e.errors()
    err = next((x for x in errors if x["type"] in UNKNOWN_KEY), errors[0])
    path = tuple(err["loc"])
    loc = (str(path[-1]) if leaf else ".".join(str(p) for p in path)) if path else "document"
    got = f" (got {err.get('input')!r})"
    if err["type"] in UNKNOWN_KEY:
        keys = list(allowed(path)) if allowed else []
        return f"unknown key {loc!r}" + (f"; allowed keys here: {', '.join(keys)}" if keys else "")
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    if err["type"] in BOUNDS:
        op, name = BOUNDS[err["type"]]
        return f"{loc} must be {op} {err['ctx'][name]}{got}"
    if err["type"] == "value_error":
        msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"].removeprefix("Value error, ")
        return msg if leaf or not path else f"{loc}: {msg}{got}"
    return f"{loc}: {err['msg']}{got}"

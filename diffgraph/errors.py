"""The errors DiffGraph raises on purpose, and the one rule for showing any error on one line.

Every failure a person sees (a GCA status reason, a chat reply, a CLI error, an HTTP error
body, a log line) is a single line that says what went wrong. Messages come from servers,
files and other libraries, so they may span lines, run long or be empty: ``RuntimeError()``
has the message "", and code that takes ``str(exc).splitlines()[0]`` of it raises IndexError
inside the very handler meant to survive it. :func:`one_line` and :func:`describe` never raise.

Errors are told apart with ``isinstance`` against these classes, never by class-name strings.
"""

from __future__ import annotations

REASON_LIMIT = 300  # characters; what a table cell or a chat line can show


def one_line(text: object, limit: int = REASON_LIMIT) -> str:
    """``text`` with all whitespace (newlines included) collapsed to single spaces, cut to
    ``limit`` characters (the last one "…" when cut)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _message(exc: BaseException) -> str:
    """str(exc), but a KeyError's own message rather than its repr (str(KeyError("x")) is "'x'")."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and type(exc).__str__ is KeyError.__str__:
        return str(exc.args[0])
    return str(exc)


def describe(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    """``Type: message`` on one line, or the type alone when the message is empty: for errors
    DiffGraph did not expect, where the type is part of what went wrong."""
    message = one_line(_message(exc), limit)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def reason(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    """The message alone (written for people by whoever raised it), or the type name when it
    is empty."""
    return one_line(_message(exc), limit) or type(exc).__name__


class DiffGraphError(Exception):
    """Base of the errors DiffGraph raises on purpose: the message is one line (whitespace
    collapsed at construction) and never empty (the class name stands in)."""

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()) or type(self).__name__)

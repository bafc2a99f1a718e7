"""Bounds on what a request may carry, so that no input makes a node answer 500 or run out of memory: the body
size (413 before the body is read whole), JSON nesting, and the length of names, rule text and row cells (400
naming the field)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from congressctl.errors import InputLimitError

MAX_JSON_DEPTH = 32
MAX_NAME_CHARS = 255
MAX_TEXT_CHARS = 64 * 1024     # rule text, and one row cell


class BodyTooLarge(Exception):
    """The request body goes past the limit (raised by the counted receive; answered 413)."""

    def __init__(self, limit: int):
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def counted(receive: Callable, limit: int) -> Callable:
    """`receive` that raises BodyTooLarge once more than `limit` body bytes arrived (chunked bodies have no
    Content-Length to check up front)."""
    seen = 0

    async def receive_counted() -> dict:
        nonlocal seen
        message: dict = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge(limit)
        return message
    return receive_counted


def loads(raw: bytes) -> Any:
    """JSON text -> value; ValueError when it is not JSON, InputLimitError when it nests so deep that the
    parser gives up."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise InputLimitError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body") from None


def deeper_than(value: Any, room: int) -> bool:
    """Whether `value` nests more than `room` containers deep (stops as soon as it knows)."""
    if not isinstance(value, (list, dict)):
        return False
    if room <= 0:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(deeper_than(v, room - 1) for v in items if isinstance(v, (list, dict)))


def check_depth(value: Any) -> None:
    if deeper_than(value, MAX_JSON_DEPTH):
        raise InputLimitError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body")


def check_name(value: Any, field: str) -> None:
    if isinstance(value, str) and len(value) > MAX_NAME_CHARS:
        raise InputLimitError(f"longer than {MAX_NAME_CHARS} characters ({len(value)})", field=field)


def check_text(value: Any, field: str) -> None:
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise InputLimitError(f"longer than {MAX_TEXT_CHARS} characters ({len(value)})", field=field)

"""Validation of identifiers that end up in SQL or broker names, and of stream ids."""

from __future__ import annotations

import re

from store import errors

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
#: Names the project chooses stay short enough to derive others from them (a rebuild's shadow schema adds a
#: suffix); names it derives may use Postgres's whole 63.
MAX_IDENTIFIER_LENGTH = 48
MAX_DERIVED_LENGTH = 63
_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
MAX_STREAM_ID_LENGTH = 255


def identifier(value: str, *, what: str = "name", max_length: int = MAX_IDENTIFIER_LENGTH) -> str:
    """Return value if it is a safe SQL identifier (schema, projection, table); raise InvalidName."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value) or len(value) > max_length:
        raise errors.InvalidName(
            f"invalid {what} {value!r}: use 1-{max_length} lowercase letters, digits and underscores, "
            "not starting with a digit"
        )
    return value


def quote(value: str, *, max_length: int = MAX_IDENTIFIER_LENGTH) -> str:
    """Quote a validated identifier for use in SQL (``max_length=MAX_DERIVED_LENGTH`` for derived names)."""
    return '"' + identifier(value, max_length=max_length) + '"'


def prefix(value: str) -> str:
    """Return value if it is a safe RabbitMQ name prefix; raise InvalidName."""
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise errors.InvalidName(
            f"invalid prefix {value!r}: use 1-100 letters, digits, '_', '.', '-'"
        )
    return value


def stream_id(value: str) -> str:
    """Return value if it is a valid stream id; raise InvalidStreamId."""
    if not isinstance(value, str):
        raise errors.InvalidStreamId(f"stream id must be a str, got {type(value).__name__}")
    if not value or len(value) > MAX_STREAM_ID_LENGTH:
        raise errors.InvalidStreamId(f"stream id must be 1 to {MAX_STREAM_ID_LENGTH} characters, got {len(value)}")
    if "\x00" in value or not value.isprintable():
        raise errors.InvalidStreamId(f"stream id {value[:40]!r} contains NUL or control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise errors.InvalidStreamId(f"stream id {value[:40]!r} is not valid unicode") from exc
    return value

"""Logging set-up: text or one JSON object per line, with the ``extra`` fields of each record.

A line logged inside a ``store.correlation`` scope (a reactor handling an event, a request) carries the
scope's ``correlation_id`` and ``causation_id`` unless its ``extra`` names them; lines about one event name
that event's own (``store.correlation_ids.of``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from store import correlation_ids
from workers.runtime import redact

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    scope = correlation_ids.current()
    if scope is not None:
        for key, value in zip(scope._fields, scope, strict=True):
            if value is not None:
                extras.setdefault(key, value)
    return extras


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the extra fields, exception text.

    The event's coordinates are always named ``projection``, ``stream`` and ``version``, whichever name
    the caller used for the stream (``stream_id`` is renamed), so one query finds every line of a stream.
    """

    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        if "stream_id" in extras and "stream" not in extras:
            extras["stream"] = extras.pop("stream_id")
        doc: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **extras,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler to whatever ``sys.stderr`` is when a record is emitted, not the one it was made with: a CLI
    command run in-process (tests, a notebook) under a replaced stderr must not leave the root logger writing to
    a stream closed since."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup(log_format: str = "text", level: int = logging.INFO, secrets: Iterable[str] = ()) -> None:
    """Send the root logger to stderr in the chosen format, with ``secrets`` and URL passwords masked."""
    handler = StderrHandler()
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler.setFormatter(redact.RedactingFormatter(formatter, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)

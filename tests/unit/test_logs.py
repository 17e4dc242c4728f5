"""The workers' log lines: a record's extra fields, and the correlation scope it was logged in."""

from __future__ import annotations

import json
import logging

from store import correlation
from workers.runtime import logs


def record(**extra: object) -> logging.LogRecord:
    line = logging.LogRecord("workers.test", logging.WARNING, __file__, 1, "something happened", None, None)
    line.__dict__.update(extra)
    return line


def fields(line: logging.LogRecord) -> dict[str, object]:
    doc = json.loads(logs.JsonFormatter().format(line))
    return {k: v for k, v in doc.items() if k not in ("time", "level", "logger", "message")}


def test_a_line_logged_inside_a_correlation_scope_carries_its_ids() -> None:
    with correlation(correlation_id="request-1", causation_id="event-1"):
        assert fields(record(projection="p")) == {"projection": "p", "correlation_id": "request-1",
                                                  "causation_id": "event-1"}


def test_a_line_logged_outside_any_scope_carries_no_ids() -> None:
    assert fields(record(projection="p")) == {"projection": "p"}


def test_ids_in_a_lines_extra_win_over_the_scopes() -> None:
    with correlation(correlation_id="request-1", causation_id="event-1"):
        assert fields(record(correlation_id="request-2")) == {"correlation_id": "request-2",
                                                              "causation_id": "event-1"}


def test_a_text_line_carries_the_scopes_ids_too() -> None:
    with correlation(correlation_id="request-1"):
        line = logs.TextFormatter().format(record(projection="p"))
    assert line.endswith("something happened projection=p correlation_id=request-1")

"""Correlation and causation ids: which request or process an event belongs to, and which event caused it.

Appends store them in each event's metadata (``correlation_id``, ``causation_id``), taken from the innermost
``correlation(...)`` scope around the append (a ``contextvars`` scope: it follows tasks and nests), or from
the ``correlation_id=``/``causation_id=`` arguments of ``append``, ``append_batch`` and
``Repository.execute``, which win over the scope; keys of a ``NewEvent``'s own metadata win over both. A
reactor that appends because of an event appends inside ``caused_by(event)``, so the follow-ups carry the
event's correlation on and name the event as their cause.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from store import errors
from store.records import RecordedEvent

CORRELATION_ID = "correlation_id"
CAUSATION_ID = "causation_id"
#: AMQP's shortstr, which the relay's message property is: longer ids would not fit it.
MAX_ID_BYTES = 255


class Correlation(NamedTuple):
    """The ids an append stores with its events; None: not stored."""

    correlation_id: str | None = None
    causation_id: str | None = None

    @classmethod
    def caused_by(cls, event: RecordedEvent) -> Correlation:
        """The ids of events caused by ``event``: its correlation carried over (its own id when it has none,
        or one no append would take, written as a ``NewEvent``'s metadata), the event itself as the cause."""
        correlation_id = event.metadata.get(CORRELATION_ID)
        if not _valid(correlation_id):
            correlation_id = str(event.event_id)
        return cls(correlation_id, str(event.event_id))


_CURRENT: contextvars.ContextVar[Correlation | None] = contextvars.ContextVar("eventfleet_correlation", default=None)


def current() -> Correlation | None:
    """The innermost ``correlation`` scope's ids, or None outside any."""
    return _CURRENT.get()


@contextlib.contextmanager
def correlation(correlation_id: str | None = None, causation_id: str | None = None) -> Iterator[Correlation]:
    """Within this block, appends store these ids with their events; an id given as None is the enclosing
    scope's. Yields the ids in force."""
    outer = _CURRENT.get() or Correlation()
    scope = Correlation(_checked(correlation_id, CORRELATION_ID) or outer.correlation_id,
                        _checked(causation_id, CAUSATION_ID) or outer.causation_id)
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)


def caused_by(event: RecordedEvent) -> contextlib.AbstractContextManager[Correlation]:
    """The scope of the events a reactor or process manager appends because of ``event``."""
    return correlation(*Correlation.caused_by(event))


def ids(correlation_id: str | None = None, causation_id: str | None = None) -> dict[str, str]:
    """The ids an append stores with its events: the arguments given, else the scope's (those that are set)."""
    scope = _CURRENT.get()
    if scope is None and correlation_id is None and causation_id is None:
        return {}
    scope = scope or Correlation()
    found: dict[str, str] = {}
    for key, given, scoped in ((CORRELATION_ID, correlation_id, scope.correlation_id),
                               (CAUSATION_ID, causation_id, scope.causation_id)):
        value = _checked(given, key) or scoped
        if value is not None:
            found[key] = value
    return found


def of(metadata: Mapping[str, Any]) -> dict[str, str]:
    """An event's correlation and causation ids, from its metadata, as log fields (those that are there)."""
    return {k: v for k in (CORRELATION_ID, CAUSATION_ID) if isinstance(v := metadata.get(k), str)}


def _valid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value.encode()) <= MAX_ID_BYTES


def _checked(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not _valid(value):
        raise errors.InvalidInput(f"{what} must be a non-empty str of at most {MAX_ID_BYTES} bytes, got {value!r}")
    return value

"""The only code that calls a projection's handlers, and the one classification of what they raise.

Whoever applies events (a worker's batch, a catch-up, a re-drive, a rebuild or a backfill) calls them
through here. What a handler raises is one of two things:

- a database outage or conflict (``store.db.TRANSIENT``, ``TransientError``): nothing is wrong with the
  event; it is raised as ``TransientError`` and the whole transaction is retried;
- anything else is the handler's own failure on this event (``HandlerFailed``, the original as its
  ``__cause__``): retried a few times, then parked per the projection's policy.

A stored event this code cannot decode (an ``Undecodable`` payload) is never handed to a handler. One of a
type this code does not know (a newer version, or a type newer code added) is no corruption: a projection
that does not handle its name passes it by, one that does is held for a worker of the newer release
(``HeldForNewerCode``: nothing is parked). Anything else fails like a handler would, so it costs its stream,
never the batch.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from projections.base import Projection
from store import db
from store import errors as store_errors
from store.records import RecordedEvent, Undecodable
from workers import errors


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """Why an event is to be parked: its handler's last error after ``attempts`` tries."""

    error: str
    traceback: str
    attempts: int

    @classmethod
    def of(cls, exc: BaseException, attempts: int) -> Failure:
        cause = exc.__cause__ if isinstance(exc, errors.HandlerFailed) and exc.__cause__ else exc
        text = "".join(traceback.format_exception(cause))
        return cls(f"{type(cause).__name__}: {cause}", text, attempts)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage or conflict of the database rather than the handler's own failure."""
    return isinstance(exc, (*db.TRANSIENT, store_errors.TransientError))


def has_set_based(projection: Projection) -> bool:
    """Whether the projection overrides ``apply_batch`` with a set-based fast path."""
    return type(projection).apply_batch is not Projection.apply_batch


def passes_by(projection: Projection, event: RecordedEvent) -> bool:
    """Whether an undecodable event is one to pass by: of a type newer code knows, which this projection does not
    handle. Raises ``HeldForNewerCode`` when it does handle it; False for anything else undecodable (poison)."""
    assert isinstance(event.event, Undecodable)
    if not isinstance(event.event.error, store_errors.UnknownEventType):
        return False
    if projection.handles_type(event.event_type):
        raise errors.HeldForNewerCode(projection.name, event)
    return True


def raise_for(projection: Projection, event: RecordedEvent | None, exc: BaseException) -> NoReturn:
    if is_transient(exc):
        raise store_errors.TransientError(f"{type(exc).__name__}: {exc}") from exc
    raise errors.HandlerFailed(projection.name, event, exc) from exc


async def apply_one(conn: db.Conn | Any, projection: Projection, event: RecordedEvent, *,
                    passthrough: tuple[type[BaseException], ...] = ()) -> None:
    """Apply one event with its handler. ``passthrough``: exceptions of the caller's own to let through
    unclassified (a rebuild's recorder that stands in for the connection)."""
    if isinstance(event.event, Undecodable):
        if passes_by(projection, event):
            return
        raise errors.HandlerFailed(projection.name, event, event.event.error) from event.event.error
    try:
        await projection.apply(conn, event)
    except passthrough:
        raise
    except Exception as exc:  # noqa: BLE001 - a handler's own error, whatever its type, is poison
        raise_for(projection, event, exc)


async def apply_each(conn: db.Conn, projection: Projection, events: Sequence[RecordedEvent]) -> None:
    """Apply events one at a time, in the order given; the first failure raises (see the module doc)."""
    for event in events:
        await apply_one(conn, projection, event)


async def apply_set(conn: db.Conn, projection: Projection, events: Sequence[RecordedEvent]) -> None:
    """Apply events with the projection's ``apply_batch``; a failure raises ``HandlerFailed`` with no event
    (the caller re-runs them one at a time to find it) or ``TransientError``."""
    if any(isinstance(e.event, Undecodable) for e in events):
        for event in events:
            if isinstance(event.event, Undecodable) and not passes_by(projection, event):
                raise errors.HandlerFailed(projection.name, event, event.event.error) from event.event.error
        events = [e for e in events if not isinstance(e.event, Undecodable)]
    try:
        await projection.apply_batch(conn, events)
    except Exception as exc:  # noqa: BLE001 - a handler's own error, whatever its type, is poison
        raise_for(projection, None, exc)


async def apply(conn: db.Conn, projection: Projection, events: Sequence[RecordedEvent], *,
                set_based: bool = True) -> None:
    """Apply events set-based when the projection has a fast path (and ``set_based``), else one at a time."""
    if not events:
        return
    if set_based and has_set_based(projection):
        await apply_set(conn, projection, events)
    else:
        await apply_each(conn, projection, events)

"""The only code that calls a projection's handlers, and the one classification of what they raise.

Whoever applies events (a worker's batch, a catch-up, a re-drive, a rebuild or a backfill) calls them
through here. What a handler raises is one of two things (``is_outage``):

- the database failing, not the event: a condition of its environment or a conflict the server reports
  by SQLSTATE (disk full, a lock timeout, read-only, a missing privilege... ``store.sqlstates``), the
  connection lost under the handler (asyncpg's connection errors, or anything at all once the connection
  it was given is closed), or a driver timeout. Nothing is wrong with the event; it is raised as
  ``TransientError`` (``EnvironmentFailure`` with the SQLSTATE and what to fix) and the whole transaction
  is retried, for as long as it takes;
- anything else is the handler's own failure on this event (``HandlerFailed``, the original as its
  ``__cause__``), whatever its type: a data or integrity error of its SQL, a wrong argument, an
  ``OSError`` such as ``FileNotFoundError`` of its own making. Retried a few times, then parked per the
  projection's policy.

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

import asyncpg

from projections.base import Projection
from store import db, sqlstates
from store import errors as store_errors
from store.codec import personal
from store.codec.personal import SubjectForgotten
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
        """The failure of exc; the personal values of its event redacted (a handler's message may quote them)."""
        cause = exc.__cause__ if isinstance(exc, errors.HandlerFailed) and exc.__cause__ else exc
        event = exc.event if isinstance(exc, errors.HandlerFailed) and exc.event is not None else None
        text = "".join(traceback.format_exception(cause))
        error = f"{type(cause).__name__}: {cause}"
        if event is not None:
            text, error = personal.redact(text, event.event), personal.redact(error, event.event)
        return cls(error, text, attempts)


#: Driver errors that mean the connection failed under the handler (a reset socket surfaces as asyncpg's
#: ConnectionDoesNotExistError), and the driver's timeouts (asyncpg cancels the statement and raises
#: TimeoutError, a ``query_canceled`` of the client's making; handlers run SQL only).
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)


def is_outage(exc: BaseException, conn: object = None) -> bool:
    """Whether a handler's ``exc`` is the database failing rather than the handler's own failure (see the
    module doc). ``conn``: the connection the handler was given; once it is closed, whatever the handler
    raised came from losing it (retrying a handler that fails for its own reason costs one more try)."""
    if isinstance(exc, (store_errors.TransientError, *CONNECTION_LOST)) or sqlstates.classify(exc) is not None:
        return True
    if isinstance(exc, store_errors.EventFleetError):
        return False
    closed = getattr(conn, "is_closed", None)
    return callable(closed) and closed() is True


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


def raise_for(projection: Projection, event: RecordedEvent | None, exc: BaseException,
              conn: object = None) -> NoReturn:
    """Raise what a handler's ``exc`` is: ``TransientError`` for an outage (``is_outage``), else ``HandlerFailed``."""
    if isinstance(exc, store_errors.TransientError):
        raise exc
    if is_outage(exc, conn):
        raise db.transient_error(exc) from exc
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
        raise_for(projection, event, exc, conn)


async def apply_each(conn: db.Conn, projection: Projection, events: Sequence[RecordedEvent]) -> None:
    """Apply events one at a time, in the order given; the first failure raises (see the module doc)."""
    for event in events:
        await apply_one(conn, projection, event)


async def apply_set(conn: db.Conn, projection: Projection, events: Sequence[RecordedEvent]) -> None:
    """Apply events with the projection's ``apply_batch``; a failure raises ``HandlerFailed`` with no event
    (the caller re-runs them one at a time to find it) or ``TransientError``. ``SubjectForgotten`` events
    never reach ``apply_batch`` (a set-based fast path written for its domain's events would drop them): they
    go through ``apply`` after it, each alone in its own stream, so the order among streams changes nothing."""
    if any(isinstance(e.event, Undecodable) for e in events):
        for event in events:
            if isinstance(event.event, Undecodable) and not passes_by(projection, event):
                raise errors.HandlerFailed(projection.name, event, event.event.error) from event.event.error
        events = [e for e in events if not isinstance(e.event, Undecodable)]
    forgotten = [e for e in events if isinstance(e.event, SubjectForgotten)]
    if forgotten:
        events = [e for e in events if not isinstance(e.event, SubjectForgotten)]
    try:
        if events or not forgotten:
            await projection.apply_batch(conn, events)
    except Exception as exc:  # noqa: BLE001 - a handler's own error, whatever its type, is poison
        raise_for(projection, None, exc, conn)
    for event in forgotten:
        await apply_one(conn, projection, event)


async def apply(conn: db.Conn, projection: Projection, events: Sequence[RecordedEvent], *,
                set_based: bool = True) -> None:
    """Apply events set-based when the projection has a fast path (and ``set_based``), else one at a time."""
    if not events:
        return
    if set_based and has_set_based(projection):
        await apply_set(conn, projection, events)
    else:
        await apply_each(conn, projection, events)

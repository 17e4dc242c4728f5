"""Closing and archiving streams: the end of a stream's life in the live table (migration 0013).

``close`` appends ``StreamClosed`` and marks the stream closed, in one transaction: from then on every insert
into it fails (``errors.StreamIsClosed``), by the events trigger, whichever path appends. ``archive`` moves a
closed stream's events to ``events_archive`` in one transaction, audited: it writes the ``archive_log`` row
(who, why, how many, which positions) first, and the events trigger lets the stream's rows be deleted only
in the transaction holding that row. It appends ``StreamArchived`` to ``archived-<stream_id>`` in the same
transaction, so the fleet hears of it. Each function takes an ``InMemoryEventStore`` too, which does the same
in memory (store/memory.py).

What stays consistent, and how:

- versions: ``closed_streams`` keeps the stream's last version; ``stream_version`` answers it after the
  events are gone, and appends stay refused (a tombstone, never deleted).
- ``read_all``, catch-ups and lag: the archived positions are simply absent. Cursors and watermarks are
  (transaction id, position) pairs compared with ``>``; none needs the row it names to exist.
- the relay: only a stream none of whose events waits in the outbox is archived (``UnpublishedEvents``
  otherwise), so no outbox row names a moved position.
- read models: a rebuild (``read_all``) never sees the archived events, so a rebuilt read model holds no
  contribution of the stream; ``StreamArchived`` lets a live projection drop it too (docs/reference.md 3.2.2).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from store import db, errors, names, queries
from store.codec import closing
from store.event_store import EventStore
from store.records import NO_STREAM, RecordedEvent

if TYPE_CHECKING:
    from store.memory import InMemoryEventStore

#: The named statements of this module, tables written ``{schema}.name``.
TEMPLATES = queries.load("store", "archive.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """An ``archive_log`` row: one archived stream, who archived it, when, why and what moved."""

    archive_id: int
    stream_id: str
    archived_by: str
    reason: str
    archived_at: dt.datetime
    events: int
    first_position: int
    last_position: int
    last_version: int


@dataclasses.dataclass(frozen=True, slots=True)
class ArchivePreview:
    """What archiving a stream would do now: ``refusal`` is the error it would raise (None: it would move
    ``events`` events)."""

    stream_id: str
    closed: bool
    archived: bool
    events: int
    unpublished: int
    halting: tuple[str, ...] = ()

    @property
    def refusal(self) -> errors.ArchiveRefused | None:
        """The error ``archive`` would raise now, or None."""
        if self.archived:
            return errors.AlreadyArchived(self.stream_id)
        if not self.closed:
            return errors.StreamNotClosed(self.stream_id)
        if self.unpublished:
            return errors.UnpublishedEvents(self.stream_id)
        if self.halting:
            return _halted(self.stream_id, self.halting)
        return None


async def preview(store: EventStore | InMemoryEventStore, stream_id: str) -> ArchivePreview:
    """What ``archive`` would do with the stream now (nothing is changed or locked)."""
    if not isinstance(store, EventStore):
        return store._preview(stream_id)
    sql = queries.bind(TEMPLATES, store.schema)
    async with store.hot.use() as conn:
        row = await conn.fetchrow(sql["archive_preview"], names.stream_id(stream_id))
    assert row is not None
    return ArchivePreview(stream_id, row["closed"], row["archived"], row["events"], row["unpublished"],
                          tuple(row["halting"]))


def _halted(stream_id: str, projections: Sequence[str]) -> errors.HaltedStream:
    return errors.HaltedStream(stream_id, f"{errors.HaltedStream.__doc__}; halted by {', '.join(projections)}")


async def close(store: EventStore | InMemoryEventStore, stream_id: str, *, reason: str = "") -> int:
    """Close a stream: append ``StreamClosed(reason)`` at its end and mark it closed, in one transaction;
    the event's version. ``StreamNotFound`` for a stream without events, ``StreamIsClosed`` if it is closed,
    ``VersionConflict`` if a writer appended meanwhile (call again)."""
    if not isinstance(store, EventStore):
        return await store._close(stream_id, reason)
    names.stream_id(stream_id)
    sql = queries.bind(TEMPLATES, store.schema)
    async with db.translate_errors(), store.pool.acquire() as conn, conn.transaction():
        version = await store.stream_version(stream_id, conn=conn)
        if version == NO_STREAM:
            raise errors.StreamNotFound(stream_id)
        result = await store.append(stream_id, [closing.StreamClosed(reason)], version, conn=conn,
                                    savepoint=False)
        await conn.execute(sql["close_stream"], stream_id, result.last_version)
    store.notifier.poke()
    return result.last_version


async def archive(store: EventStore | InMemoryEventStore, stream_id: str, *, archived_by: str,
                  reason: str) -> ArchiveEntry:
    """Move a closed stream's events to ``events_archive``, its snapshot dropped, with its ``archive_log``
    row and ``StreamArchived`` in ``archived-<stream_id>``, in one transaction; the log row.

    Refused (``ArchiveRefused``, nothing changed): ``StreamNotClosed``, ``AlreadyArchived``, or
    ``UnpublishedEvents`` while the outbox still holds any of its events, ``HaltedStream`` while a projection
    holds it halted at a parked dead letter."""
    if not isinstance(store, EventStore):
        return await store._archive(stream_id, archived_by, reason)
    names.stream_id(stream_id)
    tombstone_stream = names.stream_id(closing.archived_stream(stream_id))
    if not archived_by or not reason:
        raise errors.InvalidInput("an archival needs who (archived_by) and why (reason)")
    sql = queries.bind(TEMPLATES, store.schema)
    async with db.translate_errors(), store.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(sql["lock_closed_stream"], stream_id) is None:
            raise errors.StreamNotClosed(stream_id)
        if await conn.fetchrow(sql["archive_entry"], stream_id) is not None:
            raise errors.AlreadyArchived(stream_id)
        if await conn.fetchval(sql["unpublished_events"], stream_id):
            raise errors.UnpublishedEvents(stream_id)
        halting = [r["projection"] for r in await conn.fetch(sql["halting_projections"], stream_id)]
        if halting:
            raise _halted(stream_id, halting)
        row = await conn.fetchrow(sql["log_archive"], stream_id, archived_by, reason)
        assert row is not None  # a closed stream holds its StreamClosed at least, until archived
        entry = ArchiveEntry(**dict(row))
        moved = await conn.fetchval(sql["move_to_archive"], stream_id, entry.archive_id)
        assert moved == entry.events, (moved, entry.events)  # the stream is closed and its row locked
        await conn.execute(sql["drop_snapshot"], stream_id)
        await store.append(tombstone_stream, [closing.StreamArchived(
            stream_id, entry.archive_id, entry.events, entry.last_version, entry.first_position,
            entry.last_position, reason)], NO_STREAM, conn=conn, savepoint=False)
    store.notifier.poke()
    return entry


async def archived(store: EventStore | InMemoryEventStore, stream_id: str) -> ArchiveEntry | None:
    """The stream's ``archive_log`` row; None when it was not archived."""
    if not isinstance(store, EventStore):
        return store._archive_entry(stream_id)
    sql = queries.bind(TEMPLATES, store.schema)
    async with store.hot.use() as conn:
        row = await conn.fetchrow(sql["archive_entry"], names.stream_id(stream_id))
    return None if row is None else ArchiveEntry(**dict(row))


async def load_archived(store: EventStore | InMemoryEventStore, stream_id: str) -> list[RecordedEvent]:
    """An archived stream's events from ``events_archive``, decoded, in version order (audits, exports)."""
    if not isinstance(store, EventStore):
        return store._load_archived(stream_id)
    sql = queries.bind(TEMPLATES, store.schema)
    async with store.hot.use() as conn:
        rows = await conn.fetch(sql["load_archived"], names.stream_id(stream_id))
    return await store._records(rows)  # decoded as the store decodes its own: personal fields too

"""Reading the store for a rebuild: the next batch read while the current one is applied."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from store import db, queries
from store.event_store import EventStore, Position
from store.records import Slice, records_or_undecodable

SQL = queries.load("workers", "rebuild.sql")


#: A bounded read: the events after a position, at most ``limit`` of them and about ``max_bytes``.
Read = Callable[[Position, int, int], Coroutine[Any, Any, Slice]]

#: Event bytes per read when the caller names none (Settings.read_bytes's default).
READ_BYTES = 4 * 1024 * 1024


def _slice(rows: Sequence[Any], limit: int, store: EventStore) -> Slice:
    full = bool(rows) and (len(rows) >= limit or bool(rows[-1]["reached"]))
    return Slice(records_or_undecodable(rows, store.registry), full)


def all_reader(store: EventStore, event_names: Collection[str] | None = None) -> Read:
    """``store.read_all`` bounded in bytes too, except that events which cannot be decoded come back
    ``Undecodable``; with ``event_names`` only the events of those names (a read model's handled names),
    read along events_name_idx."""
    names = None if event_names is None else sorted(event_names)

    async def read(after: Position, limit: int, max_bytes: int) -> Slice:
        async with db.translate_errors():
            if names is None:
                rows = await store.pool.fetch(SQL["read_all"], after.transaction_id, after.global_position, limit,
                                              max_bytes)
            else:
                rows = await store.pool.fetch(SQL["read_all_of"], after.transaction_id, after.global_position,
                                              limit, max_bytes, names)
        return _slice(rows, limit, store)

    return read


def settled_reader(store: EventStore, event_names: Collection[str] | None = None) -> Read:
    """Reads in global_position order, ignoring the read_all horizon: only for a store no one writes to
    any more, where each stream's positions grow with its versions and every event is committed. With
    ``event_names``: only those names' events, in read_all order (the order of events_name_idx) without
    the horizon."""
    names = None if event_names is None else sorted(event_names)

    async def read(after: Position, limit: int, max_bytes: int) -> Slice:
        async with db.translate_errors():
            if names is None:
                rows = await store.pool.fetch(SQL["read_settled"], after.global_position, limit, max_bytes)
            else:
                rows = await store.pool.fetch(SQL["read_settled_of"], after.transaction_id,
                                              after.global_position, limit, max_bytes, names)
        return _slice(rows, limit, store)

    return read


class Prefetcher:
    """Batches of ``read`` (``all_reader`` by default), each at most ``limit`` events and about ``max_bytes``
    (the event reaching it included), the next one read on the store's pool while the caller applies the
    current one: two batches in memory at most."""

    def __init__(self, store: EventStore, after: Position, limit: int, read: Read | None = None, *,
                 max_bytes: int = READ_BYTES) -> None:
        self.after, self.limit, self.max_bytes = after, limit, max_bytes
        self.read: Read = read or all_reader(store)
        self._next: asyncio.Task[Slice] | None = None

    async def next(self) -> Slice:
        """The next batch; one that is not ``full`` means the reader reached the store's tail."""
        task = self._next or asyncio.create_task(self.read(self.after, self.limit, self.max_bytes))
        self._next = None
        events = await task
        if events:
            self.after = events[-1].position
        if events.full:
            self._next = asyncio.create_task(self.read(self.after, self.limit, self.max_bytes))
        return events

    async def aclose(self) -> None:
        """Cancel a read still in flight."""
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._next
            self._next = None

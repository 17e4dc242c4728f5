"""Reading the store for a rebuild: the next batch read while the current one is applied."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from store import db, queries
from store.event_store import EventStore, Position, RecordedEvent
from store.records import records_or_undecodable

SQL = queries.load("workers", "rebuild.sql")


Read = Callable[[Position, int], Coroutine[Any, Any, list[RecordedEvent]]]


def all_reader(store: EventStore) -> Read:
    """``store.read_all``, except that events which cannot be decoded come back ``Undecodable``."""

    async def read(after: Position, limit: int) -> list[RecordedEvent]:
        async with db.translate_errors():
            rows = await store.pool.fetch(store.queries["read_all"], after.transaction_id, after.global_position,
                                          limit)
        return records_or_undecodable(rows, store.registry)

    return read


def settled_reader(store: EventStore) -> Read:
    """Reads in global_position order, ignoring the read_all horizon: only for a store no one writes to
    any more, where each stream's positions grow with its versions and every event is committed."""

    async def read(after: Position, limit: int) -> list[RecordedEvent]:
        async with db.translate_errors():
            rows = await store.pool.fetch(SQL["read_settled"], after.global_position, limit)
        return records_or_undecodable(rows, store.registry)

    return read


class Prefetcher:
    """Batches of ``read`` (``all_reader`` by default), the next one read on the store's pool while the
    caller applies the current one."""

    def __init__(self, store: EventStore, after: Position, limit: int, read: Read | None = None) -> None:
        self.after, self.limit = after, limit
        self.read: Read = read or all_reader(store)
        self._next: asyncio.Task[list[RecordedEvent]] | None = None

    async def next(self) -> list[RecordedEvent]:
        """The next batch; a short one means the reader reached the store's tail."""
        task = self._next or asyncio.create_task(self.read(self.after, self.limit))
        self._next = None
        events = await task
        if events:
            self.after = events[-1].position
        if len(events) == self.limit:
            self._next = asyncio.create_task(self.read(self.after, self.limit))
        return events

    async def aclose(self) -> None:
        """Cancel a read still in flight."""
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._next
            self._next = None

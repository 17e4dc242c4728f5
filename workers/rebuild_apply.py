"""Applying store events to one projection's shadow tables, fast and exactly once per stream version.

A projection with its own set-based ``apply_batch`` gets whole batches. Otherwise handlers run against a
recorder that defers their ``execute()`` calls; the statements then go out with
``executemany``, grouped by SQL text, one round trip per group. Events of one stream keep their order
(round k holds the k-th event of each stream) and so do the statements of one event (step j holds each
event's j-th statement); across streams the order is free, as it is between live workers. A handler that
needs more than ``execute()`` (a fetch, a savepoint, the returned status) makes the applier fall back to
one event at a time for good; a failing handler makes it isolate the failing event and apply the
projection's policy: "skip" moves past it, "halt" stops its stream there. Either way it is recorded in
``dead_letters`` (unless the live workers parked it already) and logged. A stored event this code cannot
decode (corrupt bytes written around the store's API, a newer writer's type) is read as an ``Undecodable``
payload and fails like a handler would, so it costs its stream, never the whole rebuild or backfill.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, cast

from projections.base import Projection
from store import db, queries
from store.event_store import EventStore, Position, RecordedEvent
from store.records import Undecodable, record_or_undecodable

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "rebuild.sql")

Statement = tuple[str, tuple[Any, ...]]


class _Unbatchable(Exception):
    """The handler needs a real connection."""


class _Status:
    """What a deferred execute() returns: using it means the handler needs the real status string."""

    def _need(self, *args: object) -> NoReturn:
        raise _Unbatchable("the handler used the status returned by execute()")

    def __getattr__(self, name: str) -> NoReturn:
        self._need()


for _dunder in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__str__", "__len__",
                "__iter__", "__contains__", "__getitem__", "__hash__", "__format__"):
    setattr(_Status, _dunder, _Status._need)

_STATUS = _Status()


class _Recorder:
    """Stands in for the connection while a handler runs: records execute() calls, refuses the rest."""

    def __init__(self) -> None:
        self.statements: list[Statement] = []

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        self.statements.append((query, args))
        return _STATUS

    def __getattr__(self, name: str) -> NoReturn:
        raise _Unbatchable(f"the handler called {name}()")


@dataclasses.dataclass(frozen=True, slots=True)
class _Head:
    """Where a stream stands in the shadow after a batch."""

    version: int
    halted_version: int | None = None


class Applier:
    """Applies events to a projection's tables on the caller's connection and transaction."""

    def __init__(self, projection: Projection, store: EventStore) -> None:
        self.projection = projection
        self.store = store
        # The projection's own set-based fast path, if it has one; else our deferred-execute batching.
        self.set_based = getattr(type(projection), "apply_batch", None) is not getattr(Projection, "apply_batch", None)
        self.batchable = True
        self.record_failures = True  # in dead_letters; a verifying replay only counts them
        self.skipped = 0
        self.halted: set[str] = set()

    async def apply(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Apply the events the shadow checkpoints do not cover yet (filling gaps from the store)."""
        if not events:
            return
        stream_ids = list(dict.fromkeys(e.stream_id for e in events))
        rows = await conn.fetch(SQL["shadow_versions"], stream_ids)
        start = {r["stream_id"]: r["version"] for r in rows}
        halted = {r["stream_id"] for r in rows if r["halted_version"] is not None} | self.halted
        streams = await self._plan(conn, events, start, halted)
        if not streams:
            return
        heads = await self._run(conn, streams)
        names = list(heads)
        await conn.execute(SQL["save_shadow_versions"], names, [heads[s].version for s in names],
                           [heads[s].halted_version for s in names])

    async def _plan(self, conn: db.Conn, events: Sequence[RecordedEvent], start: dict[str, int],
                    halted: set[str]) -> dict[str, list[RecordedEvent]]:
        """Per stream, in version order, the events after its shadow checkpoint, gaps loaded from the store."""
        streams: dict[str, list[RecordedEvent]] = {}
        gaps: list[tuple[str, int, int]] = []
        for e in events:
            if e.stream_id in halted:
                continue
            planned = streams.get(e.stream_id)
            current = planned[-1].version if planned else start.get(e.stream_id, -1)
            if e.version <= current:
                continue  # already in the shadow
            if e.version > current + 1:
                gaps.append((e.stream_id, current + 1, e.version - 1))
            streams.setdefault(e.stream_id, []).append(e)
        if gaps:
            rows = await conn.fetch(SQL["load_ranges"], *(list(column) for column in zip(*gaps, strict=True)))
            for row in rows:
                streams[row["stream_id"]].append(record_or_undecodable(row, self.store.registry))
            for stream_events in streams.values():
                stream_events.sort(key=lambda e: e.version)
        return streams

    async def _run(self, conn: db.Conn, streams: dict[str, list[RecordedEvent]]) -> dict[str, _Head]:
        done = {s: _Head(evs[-1].version) for s, evs in streams.items()}
        if any(isinstance(e.event, Undecodable) for evs in streams.values() for e in evs):
            return await self._isolating(conn, streams)  # never hand a handler what it cannot read
        if self.set_based:
            try:
                async with conn.transaction():
                    await self.projection.apply_batch(conn, [e for evs in streams.values() for e in evs])
                return done
            except Exception as exc:
                if isinstance(exc, db.TRANSIENT):
                    raise
        elif self.batchable:
            try:
                async with conn.transaction():
                    await self._batched(conn, streams)
                return done
            except _Unbatchable as exc:
                logger.info("handlers need a real connection: applying one event at a time",
                            extra={"projection": self.projection.name, "reason": str(exc)})
                self.batchable = False
            except Exception as exc:
                if isinstance(exc, db.TRANSIENT):
                    raise
        try:
            async with conn.transaction():
                for stream_events in streams.values():
                    for e in stream_events:
                        await self.projection.apply(conn, e)
            return done
        except Exception as exc:
            if isinstance(exc, db.TRANSIENT):
                raise
        return await self._isolating(conn, streams)

    async def _batched(self, conn: db.Conn, streams: dict[str, list[RecordedEvent]]) -> None:
        for k in range(max(len(evs) for evs in streams.values())):
            recorded: list[list[Statement]] = []
            for stream_events in streams.values():
                if k < len(stream_events):
                    recorder = _Recorder()
                    await self.projection.apply(cast(db.Conn, recorder), stream_events[k])
                    recorded.append(recorder.statements)
            for j in range(max((len(s) for s in recorded), default=0)):
                groups: dict[str, list[tuple[Any, ...]]] = {}
                for statements in recorded:
                    if j < len(statements):
                        query, args = statements[j]
                        groups.setdefault(query, []).append(args)
                for query, arg_list in groups.items():
                    await conn.executemany(query, arg_list)

    async def _isolating(self, conn: db.Conn, streams: dict[str, list[RecordedEvent]]) -> dict[str, _Head]:
        """One savepoint per event: a failing handler costs only its event, then the policy decides."""
        heads: dict[str, _Head] = {}
        for stream_id, stream_events in streams.items():
            for e in stream_events:
                try:
                    async with conn.transaction():
                        if isinstance(e.event, Undecodable):
                            raise e.event.error
                        await self.projection.apply(conn, e)
                except Exception as exc:
                    if isinstance(exc, db.TRANSIENT):
                        raise
                    if await self._failed(conn, e, exc):
                        heads[stream_id] = _Head(e.version - 1, e.version)
                        break
                heads[stream_id] = _Head(e.version)
        return heads

    async def _failed(self, conn: db.Conn, event: RecordedEvent, exc: Exception) -> bool:
        """Record a failing event; True if the policy halts its stream."""
        halt = self.projection.policy == "halt"
        logger.warning("handler failed during rebuild", extra={
            "projection": self.projection.name, "stream": event.stream_id, "version": event.version,
            "error": f"{type(exc).__name__}: {exc}", "policy": self.projection.policy})
        if self.record_failures:
            await conn.execute(SQL["park_failure"], self.projection.name, event.stream_id, event.version,
                               event.global_position, event.event_id, event.event_type,
                               f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)),
                               "parked" if halt else "skipped")
        if halt:
            self.halted.add(event.stream_id)
        else:
            self.skipped += 1
        return halt


Read = Callable[[Position, int], Coroutine[Any, Any, list[RecordedEvent]]]


def all_reader(store: EventStore) -> Read:
    """``store.read_all``, except that events which cannot be decoded come back ``Undecodable``."""

    async def read(after: Position, limit: int) -> list[RecordedEvent]:
        async with db.translate_errors():
            rows = await store.pool.fetch(store.queries["read_all"], after.transaction_id, after.global_position,
                                          limit)
        return [record_or_undecodable(r, store.registry) for r in rows]

    return read


def settled_reader(store: EventStore) -> Read:
    """Reads in global_position order, ignoring the read_all horizon: only for a store no one writes to
    any more, where each stream's positions grow with its versions and every event is committed."""

    async def read(after: Position, limit: int) -> list[RecordedEvent]:
        async with db.translate_errors():
            rows = await store.pool.fetch(SQL["read_settled"], after.global_position, limit)
        return [record_or_undecodable(r, store.registry) for r in rows]

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

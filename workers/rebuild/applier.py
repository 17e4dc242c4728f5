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

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, NoReturn

from projections.base import Projection
from store import correlation_ids, db, queries
from store.event_store import EventStore, RecordedEvent
from store.records import Undecodable, records_or_undecodable
from workers import errors, handlers

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "rebuild.sql")
EVENTS = queries.load("workers", "events.sql")

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

    def __init__(self, projection: Projection, store: EventStore, *, reference: bool = False) -> None:
        """``reference``: handlers one event at a time, no set-based or deferred batching, and failures counted,
        not recorded in ``dead_letters`` (a verifying replay touches nothing of the live state)."""
        self.projection = projection
        self.store = store
        #: The event names it handles (None: all); a gap in its stream's versions is loaded with only those.
        self.names = projection.handled_names()
        # The projection's own set-based fast path, if it has one; else our deferred-execute batching.
        self.set_based = handlers.has_set_based(projection) and not reference
        self.batchable = not reference
        self.record_failures = not reference
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
            rows = await self.load_ranges(conn, *(list(column) for column in zip(*gaps, strict=True)))
            for row, event in zip(rows, records_or_undecodable(rows, self.store.registry), strict=True):
                streams[row["stream_id"]].append(event)
            for stream_events in streams.values():
                stream_events.sort(key=lambda e: e.version)
        return streams

    async def load_ranges(self, conn: db.Conn, stream_ids: list[str], firsts: list[int],
                          lasts: list[int]) -> list[Any]:
        """The stored rows of these version ranges (inclusive) that the projection handles, by stream and version.

        A read model that handles a few types reads only those (its versions have gaps: 0, 3, 7), so a gap
        here is the versions between the last one it applied and the event at hand, of which the reader has
        passed the events it handles, except one a transaction with an older id appended after (read later).
        """
        if self.names is None:
            return list(await conn.fetch(EVENTS["load_ranges"], stream_ids, firsts, lasts))
        return list(await conn.fetch(EVENTS["load_ranges_of"], stream_ids, firsts, lasts, sorted(self.names)))

    async def _run(self, conn: db.Conn, streams: dict[str, list[RecordedEvent]]) -> dict[str, _Head]:
        done = {s: _Head(evs[-1].version) for s, evs in streams.items()}
        if any(isinstance(e.event, Undecodable) for evs in streams.values() for e in evs):
            return await self._isolating(conn, streams)  # never hand a handler what it cannot read
        if self.set_based:
            with contextlib.suppress(errors.HandlerFailed):
                async with conn.transaction():
                    await handlers.apply_set(conn, self.projection, [e for evs in streams.values() for e in evs])
                return done
        elif self.batchable:
            try:
                async with conn.transaction():
                    await self._batched(conn, streams)
                return done
            except _Unbatchable as exc:
                logger.info("handlers need a real connection: applying one event at a time",
                            extra={"projection": self.projection.name, "reason": str(exc)})
                self.batchable = False
            except errors.HandlerFailed:
                pass
        with contextlib.suppress(errors.HandlerFailed):
            async with conn.transaction():
                for stream_events in streams.values():
                    await handlers.apply_each(conn, self.projection, stream_events)
            return done
        return await self._isolating(conn, streams)

    async def _batched(self, conn: db.Conn, streams: dict[str, list[RecordedEvent]]) -> None:
        for k in range(max(len(evs) for evs in streams.values())):
            recorded: list[list[Statement]] = []
            for stream_events in streams.values():
                if k < len(stream_events):
                    recorder = _Recorder()
                    await handlers.apply_one(recorder, self.projection, stream_events[k],
                                             passthrough=(_Unbatchable,))
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
                        await handlers.apply_one(conn, self.projection, e)
                except errors.HandlerFailed as exc:
                    if await self._failed(conn, e, handlers.Failure.of(exc, 1)):
                        heads[stream_id] = _Head(e.version - 1, e.version)
                        break
                heads[stream_id] = _Head(e.version)
        return heads

    async def _failed(self, conn: db.Conn, event: RecordedEvent, failure: handlers.Failure) -> bool:
        """Record a failing event; True if the policy halts its stream."""
        halt = self.projection.policy == "halt"
        logger.warning("handler failed during rebuild", extra={
            "projection": self.projection.name, "stream": event.stream_id, "version": event.version,
            "error": failure.error, "policy": self.projection.policy, **correlation_ids.of(event.metadata)})
        if self.record_failures:
            await conn.execute(SQL["park_failure"], self.projection.name, event.stream_id, event.version,
                               event.global_position, event.event_id, event.event_type,
                               failure.error, failure.traceback, "parked" if halt else "skipped")
        if halt:
            self.halted.add(event.stream_id)
        else:
            self.skipped += 1
        return halt

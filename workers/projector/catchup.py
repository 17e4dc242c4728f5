"""Catch-up from the store: a projection far behind reads its backlog from the event store, not the broker.

The broker carries news, one message per event and projection, and receiving a message costs a Python
worker more CPU than applying its event in a batch. So when a projection's lag passes
``Settings.catchup_threshold`` (measured by the lag monitor), one worker process per projection (a session
advisory lock) reads ``read_all`` from the projection's low watermark in large batches, decodes each batch
once for all the projections it catches up, and applies it through the same exactly-once path as
deliveries (``Consumer.apply_from_store``: checkpoints claimed in the batch's own transaction, poison
retried and parked). This is the catch-up subscription of EventStoreDB and the async daemon of Marten.

As each batch commits, the catch-up tells the process's consumers its cursor: every event at or before
it is settled, so a delivery at or before it is acked with no database work (``Consumer.settled``).
While the catch-up runs, a consumer holds deliveries beyond the cursor instead of applying them one
gap-fill at a time: the catch-up gets to them from the store. The catch-up ends when it reaches the
store's frontier and the queues hold little, or when the frontier stops moving (a long transaction
holds the horizon); then the consumers carry on as usual.

Correctness does not depend on any of this. Every applied event goes through the checkpoints, so an
event that arrives from the store, the broker or both is applied exactly once; the cursor is only ever
moved past events whose batch has committed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aio_pika.abc import AbstractChannel

from projections.base import Projection
from store import db
from store import errors as store_errors
from store.event_store import EventStore, Position, RecordedEvent
from store.queries import load
from workers import locks
from workers.config import Settings
from workers.projector.checkpoints import BatchResult
from workers.projector.lag import Lag
from workers.runtime import metrics, retry

logger = logging.getLogger(__name__)

SQL = load("workers", "catchup.sql")

#: Batches applied at once: while Postgres works on one, the next is decoded and planned.
APPLYING_AHEAD = 2
#: Pause between reads at the frontier while the queues still hold a backlog of settled deliveries.
FRONTIER_POLL_SECONDS = 0.05
#: After a catch-up met a stored event it cannot decode, the next one waits this long.
CODEC_ERROR_PAUSE_SECONDS = 60.0
#: A frontier that has not moved for this long is held by a long transaction: the catch-up gives up.
FRONTIER_STUCK_SECONDS = 2.0




class Target(Protocol):
    """What a catch-up needs of a projection's consumer (``workers.projector.consumer.Consumer``): the catch-up
    tells it where the settled events end, and applies the store's events through its exactly-once path."""

    projection: Projection
    channel: AbstractChannel

    def begin_catch_up(self, start: Position) -> None: ...
    def settled(self, position: Position) -> None: ...
    def at_frontier(self) -> None: ...
    def end_catch_up(self) -> None: ...
    async def backlog(self) -> int: ...
    async def apply_from_store(self, events: Sequence[RecordedEvent]) -> BatchResult: ...


class CatchUp:
    """One worker process's catch-ups: requested by the lag monitor, run against the session's consumers."""

    def __init__(self, store: EventStore, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self.consumers: dict[str, Target] = {}
        self._due: set[str] = set()
        self._pause_until = 0.0  # no catch-ups before (after one met an undecodable event)
        self._wake = asyncio.Event()

    def note_lag(self, projection: str, lag: Lag) -> None:
        """The lag monitor's measurement: every delivery up to the watermark is settled (the consumers ack
        its copies with no database work, in every replica), and a catch-up is due when far enough behind."""
        consumer = self.consumers.get(projection)
        if consumer is not None:
            consumer.settled(lag.watermark)
        threshold = self.settings.catchup_threshold
        if threshold and lag.lag_events >= threshold and time.monotonic() >= self._pause_until:
            self._due.add(projection)
            self._wake.set()

    def attach(self, consumers: Sequence[Target]) -> None:
        """The consumers of the current broker session (a new session attaches its own)."""
        self.consumers = {c.projection.name: c for c in consumers}

    async def run(self, stop: asyncio.Event) -> None:
        """Serve catch-up requests until ``stop``; failures end one catch-up, never the worker."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waker, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if stop.is_set():
                    break
                self._wake.clear()
                due, self._due = self._due, set()
                consumers = [self.consumers[name] for name in sorted(due) if name in self.consumers]
                if not consumers:
                    continue
                try:
                    await self.catch_up(consumers, stop)
                except store_errors.CodecError as exc:
                    # A stored event this code cannot decode (written by newer or foreign writers): the
                    # consumers meet it one stream at a time and park it per policy; catch-ups pause.
                    self._pause_until = time.monotonic() + CODEC_ERROR_PAUSE_SECONDS
                    logger.warning("catch-up stopped at an event it cannot decode; the consumers carry on",
                                   extra={"error": str(exc), "pause_seconds": CODEC_ERROR_PAUSE_SECONDS})
                except retry.OUTAGE_ERRORS as exc:
                    logger.warning("catch-up interrupted by an outage; the consumers carry on",
                                   extra={"error": f"{type(exc).__name__}: {exc}"})
                except Exception:
                    logger.exception("catch-up failed; the consumers carry on")
        finally:
            stopper.cancel()

    async def catch_up(self, consumers: Sequence[Target], stop: asyncio.Event | None = None) -> dict[str, int]:
        """Read the projections' backlog from the store and apply it; return events read per projection.

        Projections another process is catching up, or that are not ``live`` (a rebuild or backfill
        fills them), are left to their consumers.
        """
        stop = stop or asyncio.Event()
        read: dict[str, int] = {}
        async with db.translate_errors(), self.store.pool.acquire() as conn:
            group = await self._claim(conn, consumers)
            if not group:
                return read
            cursor = min(start for _, start in group)
            try:
                for consumer, start in group:
                    consumer.begin_catch_up(start)
                    read[consumer.projection.name] = 0
                logger.debug("catching up from the store", extra={
                    "projections": sorted(read), "after": [cursor.transaction_id, cursor.global_position]})
                started = time.perf_counter()
                reading, applying = await self._loop(conn, [c for c, _ in group], cursor, read, stop)
                # A lag made of a halted stream's held events asks again every refresh and finds little
                # to read: only a catch-up that read a backlog is worth an INFO line.
                level = logging.INFO if max(read.values()) >= self.settings.catchup_threshold else logging.DEBUG
                logger.log(level, "caught up", extra={"projections": read,
                                                      "seconds": round(time.perf_counter() - started, 3),
                                                      "reading_seconds": round(reading, 3),
                                                      "applying_seconds": round(applying, 3)})
            finally:
                for consumer, _ in group:
                    consumer.end_catch_up()
                    with contextlib.suppress(*retry.OUTAGE_ERRORS):
                        await locks.release(conn, locks.catchup(self.store.schema, consumer.projection.name))
        return read

    async def _claim(self, conn: db.Conn, consumers: Sequence[Target]) -> list[tuple[Target, Position]]:
        """Lock each live projection nobody else catches up; its start is its low watermark."""
        group: list[tuple[Target, Position]] = []
        for consumer in consumers:
            key = locks.catchup(self.store.schema, consumer.projection.name)
            if not await locks.try_hold(conn, key):
                continue
            row = await conn.fetchrow(SQL["catchup_start"], consumer.projection.name)
            if row is None:  # nothing applied yet, no backfill claimed: live from the start
                group.append((consumer, Position.START))
            elif row["state"] == "live":
                group.append((consumer, Position(row["watermark_txid"], row["watermark_position"])))
            else:
                await locks.release(conn, key)
        return group

    async def _loop(self, conn: db.Conn, group: list[Target], cursor: Position, read: dict[str, int],
                    stop: asyncio.Event) -> tuple[float, float]:
        """Read, apply and settle batches until the frontier; return the seconds spent waiting for reads
        (beyond the overlap with applying) and for applies.

        Up to ``APPLYING_AHEAD`` batches are applied at once, each in its own transactions: while Postgres
        works on one, this process decodes and plans the next. Batches that share a stream or a read-model
        row queue on its lock in Postgres, in batch order (the checkpoints keep every event exactly once
        whatever the order, as with competing workers); the cursor only moves once a batch and every
        batch before it committed.
        """
        limit = self.settings.catchup_batch_size
        reading = applying = 0.0
        pending: asyncio.Future[list[RecordedEvent]] | None = None
        applies: collections.deque[tuple[asyncio.Future[Any], Position, int]] = collections.deque()

        def read_after(position: Position) -> asyncio.Future[list[RecordedEvent]]:
            return asyncio.ensure_future(self.store.read_all(after=position, limit=limit, conn=conn))

        async def settle_oldest() -> float:
            """Wait for the oldest batch in flight and settle it; return the seconds waited."""
            began = time.perf_counter()
            task, last, count = applies[0]
            try:
                await task
            finally:
                applies.popleft()
            for consumer in group:
                consumer.settled(last)
                read[consumer.projection.name] += count
                metrics.CAUGHT_UP.labels(consumer.projection.name).inc(count)
            return time.perf_counter() - began

        try:
            last, stuck_since = cursor, None
            events = await self.store.read_all(after=cursor, limit=limit, conn=conn)
            while True:
                full = len(events) == limit
                if full:  # read the next batch while this one is applied (Postgres works in another process)
                    pending = read_after(events[-1].position)
                if events:
                    last, stuck_since = events[-1].position, None
                    applies.append((asyncio.gather(*(c.apply_from_store(events) for c in group)), last, len(events)))
                    if len(applies) >= APPLYING_AHEAD:
                        applying += await settle_oldest()
                if stop.is_set() or any(c.channel.is_closed for c in group):
                    break
                if not full:
                    while applies:  # everything read is settled before the frontier's decisions
                        applying += await settle_oldest()
                    # At the frontier: let the consumers drain what is settled, and keep reading while the
                    # queues still hold a backlog (events written now would wait behind it on the broker).
                    for consumer in group:
                        consumer.at_frontier()
                    stuck_since = stuck_since or time.monotonic()
                    if time.monotonic() - stuck_since > FRONTIER_STUCK_SECONDS:
                        break  # a long transaction holds the horizon: the consumers take the rest
                    if max([await c.backlog() for c in group]) <= self.settings.prefetch:
                        break
                    await asyncio.sleep(FRONTIER_POLL_SECONDS)
                    pending = read_after(last)
                assert pending is not None
                began = time.perf_counter()
                events, pending = await pending, None
                reading += time.perf_counter() - began
            while applies:
                applying += await settle_oldest()
            return reading, applying
        finally:
            # Let reads and applies in flight finish: a cancelled query would spoil its connection. A batch
            # that failed ends the catch-up; the ones after it may have committed, which the checkpoints allow.
            for task in [*(t for t, _, _ in applies), *([pending] if pending is not None else [])]:
                with contextlib.suppress(Exception):
                    await task

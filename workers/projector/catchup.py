"""Catch-up: a partition far behind reads its backlog from the store instead of waiting for the broker.

When the lag monitor finds the partition ``Settings.catchup_threshold`` events behind, or an unapplied event
waited ``STALL_SECONDS``, its consumer reads the partition's backlog from the store
(``EventStore.read_partition``, from the projection's low watermark, in reads of ``catchup_batch_size`` events
or ``read_bytes``, the next overlapping the apply) and applies it through the projection's apply step
(``Batcher.apply_read``); deliveries it has passed are then duplicates to their checkpoints. Every worker
catches up its own partitions, at the same time. Correctness depends on none of it: every event goes through
the per-stream checkpoints in its batch's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from store import db
from store import errors as store_errors
from store.event_store import Position
from store.queries import load
from workers.config import Settings
from workers.projector.batcher import Batcher
from workers.runtime import retry

logger = logging.getLogger(__name__)

SQL = load("workers", "catchup.sql")

#: How long an unapplied event of a partition may wait before the partition catches up from the store, however
#: few events it lags (``CatchUp.note_lag``): several lag refreshes (``lag.REFRESH_SECONDS``), far above the
#: second or two the live path takes.
STALL_SECONDS = 10.0


class CatchUp:
    """One partition's catch-ups for one projection: due when the lag monitor says so (``note_lag``), run
    by its consumer between batches (``if_due``)."""

    def __init__(self, batcher: Batcher, partition: int, settings: Settings, *,
                 catchups: asyncio.Semaphore | None = None, gone: Callable[[], bool] = lambda: False) -> None:
        self.batcher, self.partition, self.settings = batcher, partition, settings
        self.store, self.projection = batcher.store, batcher.projection
        self.catchups = catchups or asyncio.Semaphore(1)
        self.gone = gone  # the consumer stopped, or its channel closed: the read in flight is the last
        self.due_from: Position | None = None  # a catch-up is due, from there
        self.applied = 0  # events applied by this partition's catch-ups (not found applied already)
        #: Wakes the consumer when a catch-up becomes due (it may be waiting for a delivery).
        self.wake: Callable[[], None] = lambda: None

    def note_lag(self, lag_events: int, watermark: Position, oldest_age: float = 0.0) -> None:
        """The partition's lag, the age of its oldest unapplied event and the projection's watermark: catch up
        from the watermark when far behind (``catchup_threshold`` events), or when an unapplied event has waited
        ``STALL_SECONDS`` (catch-up on: a threshold of 0 turns both off).

        The second is the store being the truth whatever the broker says: committed events that no message will
        bring any more (an asynchronous failover lost the worker's own apply after the broker had its ack, a
        message dropped by a broker) would wait for news that never comes; a live partition applies its events
        within a second or two, so one that waited that long is stalled, or so far behind that reading the store
        is the faster way anyway."""
        threshold = self.settings.catchup_threshold
        due = bool(threshold) and (lag_events >= threshold or (lag_events > 0 and oldest_age >= STALL_SECONDS))
        if due and self.due_from is None:
            self.due_from = watermark
            self.wake()

    async def run(self, start: Position, stop: asyncio.Event | None = None) -> int:
        """Read the partition's events after ``start`` from the store and apply them until the frontier;
        move the cursor as each batch commits; return the events read. One read runs ahead of each apply."""
        limit, max_bytes = self.settings.catchup_batch_size, self.settings.read_bytes
        # Only the types it handles: an event of another type is nothing to this read model (issue 25).
        names = self.projection.handled_names()
        read = 0
        began = time.perf_counter()
        async with self.catchups:
            events = await self.store.read_partition(self.partition, start, limit, max_bytes=max_bytes,
                                                     event_names=names)
            while events:
                pending = (asyncio.ensure_future(self.store.read_partition(
                    self.partition, events[-1].position, limit, max_bytes=max_bytes, event_names=names))
                    if events.full else None)
                try:
                    # Counted at once, not kept: the batch read next must not wait beside this one's events.
                    self.applied += len((await self.batcher.apply_read(events, self.partition, self.gone)).applied)
                except BaseException:
                    if pending is not None:  # a cancelled query would spoil its connection: let it finish
                        with contextlib.suppress(Exception):
                            await pending
                    raise
                read += len(events)
                if pending is None or (stop is not None and stop.is_set()) or self.gone():
                    if pending is not None:
                        with contextlib.suppress(Exception):
                            await pending
                    break
                events = await pending
        level = logging.INFO if read >= self.settings.catchup_threshold else logging.DEBUG
        logger.log(level, "caught up", extra={"projection": self.projection.name, "partition": self.partition,
                                              "events": read, "seconds": round(time.perf_counter() - began, 3)})
        return read

    async def if_due(self, stop: asyncio.Event) -> None:
        """Catch up if the lag monitor said so since the last time, unless a backfill or rebuild fills the
        projection from the store (its consumers keep the queue moving meanwhile). An outage or an event it
        cannot decode ends the catch-up early; the queue carries on."""
        start, self.due_from = self.due_from, None
        if start is None:
            return
        try:
            async with db.translate_errors():
                state = await self.store.pool.fetchval(SQL["projection_state"], self.projection.name)
        except retry.OUTAGE_ERRORS:
            return
        if state not in (None, "live"):
            return
        try:
            await self.run(start, stop)
        except store_errors.CodecError as exc:
            logger.warning("catch-up stopped at an event it cannot decode; the queue carries on",
                           extra={"projection": self.projection.name, "partition": self.partition, "error": str(exc)})
        except retry.OUTAGE_ERRORS as exc:
            logger.warning("catch-up interrupted by an outage; the queue carries on", extra={
                "projection": self.projection.name, "partition": self.partition,
                "error": f"{type(exc).__name__}: {exc}"})

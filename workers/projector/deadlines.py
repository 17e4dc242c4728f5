"""Firing a reactor's deadlines: exactly once, in order of due time, by the worker holding their partition.

A deadline lives in ``deadlines`` under (reactor, key), in the partition of its key. The consumer of a
reactor's partition fires that partition's due deadlines in transactions of up to ``BATCH`` deadlines: each
one's ``on_deadline`` runs in a savepoint (``Reactor.fire``) and the deadline row is deleted in the same
transaction, so the effects and the removal commit together or not at all. Rows are taken ``FOR UPDATE
SKIP LOCKED``: a worker that lost the partition while it was still firing, and its successor, never fire
one deadline twice. A deadline whose handler keeps failing is retried ``ATTEMPTS`` times, then kept as a
dead letter (``deadline:<key>``, its payload as the body) and removed, so the deadlines behind it go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import traceback
import uuid
from collections.abc import Callable

from projections import reactor as reactors
from projections.reactor import Deadline, Reactor
from store import codec, db
from store.event_store import EventStore
from store.queries import load
from workers import errors, handlers, locks
from workers.projector.batcher import Batcher
from workers.runtime import metrics, retry

logger = logging.getLogger(__name__)

SQL = load("workers", "deadlines.sql")

#: Deadlines fired per transaction.
BATCH = 200
#: Tries of a deadline whose handler fails before it is parked.
ATTEMPTS = 3
#: The longest a partition's consumer sleeps between looks for due deadlines (others' schedules are not heard).
POLL_SECONDS = 1.0


@dataclasses.dataclass(slots=True)
class Fired:
    """What one round fired, and the seconds until the next deadline is due (None: none pending)."""

    fired: int = 0
    parked: int = 0
    next_due: float | None = None
    causes: list[uuid.UUID] = dataclasses.field(default_factory=list)  # the fired deadlines' ids
    reacted: reactors.Outcome = dataclasses.field(default_factory=reactors.Outcome)  # what their handlers did


class _Rerun(Exception):
    """A deadline of a batch run as one piece raised: run the batch again, one savepoint per deadline."""


class Firing:
    """One partition's deadlines of one reactor: ``round`` fires what is due."""

    def __init__(self, store: EventStore, reactor: Reactor, partition: int) -> None:
        self.store, self.reactor, self.partition = store, reactor, partition
        self._failures: dict[str, int] = {}  # key -> failed tries

    async def round(self) -> Fired:
        """Fire due deadlines in transactions of ``BATCH`` until none is due; then say when the next one is."""
        result = Fired()
        while True:
            fired, reacted, parked, full = await self._batch()
            result.fired += len(fired)
            result.causes += fired
            result.parked += parked
            result.reacted.add(reacted)
            if not full:
                break
        async with db.translate_errors():
            row = await self.store.pool.fetchrow(SQL["next_due"], self.reactor.name, self.partition)
        assert row is not None
        result.next_due = row["next_due"]
        metrics.DEADLINES_PENDING.labels(self.reactor.name).set(row["pending"])
        return result

    async def _batch(self) -> tuple[list[uuid.UUID], reactors.Outcome, int, bool]:
        """One transaction of due deadlines: first as one piece (no savepoint per deadline); if any of them
        raises, that transaction is rolled back and the same deadlines run again, each in its savepoint.
        Returns the fired deadlines' ids, what their handlers did, the deadlines parked, whether it was full."""
        try:
            with reactors.recording() as outcomes:
                fired, parked, full = await self._fire(safe=False)
        except _Rerun:
            with reactors.recording() as outcomes:
                fired, parked, full = await self._fire(safe=True)
        return fired, outcomes.committed(fired), parked, full

    async def _fire(self, *, safe: bool) -> tuple[list[uuid.UUID], int, bool]:
        name = self.reactor.name
        lateness: list[float] = []
        fired: list[uuid.UUID] = []
        parked = 0
        async with db.translate_errors(), self.store.pool.acquire() as conn, conn.transaction():
            await locks.share(conn, locks.projection(self.store.schema, name))
            rows = await conn.fetch(SQL["due"], name, self.partition, BATCH)
            due = [Deadline(name, row["key"], row["due_at"], codec.unpackb(row["payload"]), row["deadline_id"],
                            row["correlation_id"], row["scheduled_by"]) for row in rows]
            if not safe:
                try:
                    await self.reactor.fire_all(conn, due)
                except Exception as exc:
                    if handlers.is_outage(exc, conn):
                        raise
                    raise _Rerun from exc
                await conn.execute(SQL["fired_all"], name, [d.key for d in due], [d.deadline_id for d in due])
                lateness = [max(0.0, row["lateness_seconds"]) for row in rows]
                fired = [d.deadline_id for d in due]
            for row, deadline in zip(rows, due, strict=True) if safe else ():
                try:
                    async with conn.transaction():  # a failing handler costs its own deadline only
                        await self._fire_one(conn, deadline)
                except errors.HandlerFailed as failed:
                    if await self._failed(conn, deadline, failed):
                        parked += 1
                    continue
                await conn.execute(SQL["fired"], name, deadline.key, deadline.deadline_id)
                self._failures.pop(deadline.key, None)
                lateness.append(max(0.0, row["lateness_seconds"]))
                fired.append(deadline.deadline_id)
            if fired:
                await conn.execute(SQL["count_fired"], name, len(fired))
        if lateness:
            metrics.DEADLINES_FIRED.labels(name).inc(len(lateness))
            metrics.DEADLINE_LATENESS.observe_many(name, lateness)
        return fired, parked, len(due) == BATCH and bool(lateness)

    async def _fire_one(self, conn: db.Conn, deadline: Deadline) -> None:
        try:
            await self.reactor.fire(conn, deadline)
        except Exception as exc:  # noqa: BLE001 - classified like any handler's error
            handlers.raise_for(self.reactor, None, exc)

    async def _failed(self, conn: db.Conn, deadline: Deadline, failed: BaseException) -> bool:
        """Count a failed try; park the deadline after ``ATTEMPTS``. Returns whether it was parked."""
        tries = self._failures.get(deadline.key, 0) + 1
        self._failures[deadline.key] = tries
        cause = failed.__cause__ or failed
        logger.warning("deadline handler failed", extra={
            "reactor": self.reactor.name, "key": deadline.key, "attempt": tries, "error": f"{cause!r}"})
        if tries < ATTEMPTS:
            return False
        await conn.execute(SQL["park"], self.reactor.name, deadline.key, deadline.deadline_id,
                           f"{type(cause).__name__}: {cause}", "".join(traceback.format_exception(cause)), tries,
                           "parked")
        self._failures.pop(deadline.key, None)
        metrics.DEAD_LETTERED.labels(self.reactor.name).inc()
        return True


async def fire(batcher: Batcher, partition: int, done: Callable[[], bool]) -> None:
    """A reactor's partition: fire its due deadlines until ``done()``, looking again when the next is due, or
    every ``POLL_SECONDS`` (deadlines scheduled by other partitions' consumers). Outages are retried until
    ``done()``; what their handlers did is counted by the reactor's apply step (``Batcher.reacted``)."""
    assert isinstance(batcher.projection, Reactor)
    firing = Firing(batcher.store, batcher.projection, partition)
    while not done():
        try:
            fired = await batcher.retrying(firing.round, done)
        except retry.OUTAGE_ERRORS:
            return  # stopping, or the channel is gone: the next owner fires them
        if fired.fired:
            batcher.reacted(fired.reacted)
        wait = POLL_SECONDS if fired.next_due is None else min(max(fired.next_due, 0.0), POLL_SECONDS)
        slept = 0.0
        while slept < wait and not done():
            await asyncio.sleep(min(0.1, wait - slept))
            slept += 0.1

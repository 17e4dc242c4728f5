"""Exact projection lag: a low watermark advanced periodically, then only the tail after it is counted.

The watermark is a read_all position (transaction id, global position) in ``projection_status``: every
event at or before it is applied, skipped, or belongs to a halted stream. Advancing it scans only events
newer than it and stops at the first event that is none of these, and never passes the store's horizon
(a transaction still running may commit events ordered before anything above it). Lag is then the tail
after the watermark not covered by checkpoints, plus the unapplied events of halted streams before it;
the count is exact at any moment, the watermark only keeps it cheap.

A read model that handles a few event types (``Projection.handled_names()``) is measured against those
only, read along the store's index of names: an event of another type is not lag, the watermark passes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable, Collection, Mapping, Sequence

from projections import registry
from store import db
from store.queries import load
from store.records import Position
from workers import locks
from workers.runtime import health as health_mod
from workers.runtime import metrics, retry

logger = logging.getLogger(__name__)

SQL = load("workers", "lag.sql")

#: Events scanned per advance statement; the advancer repeats while it keeps moving a full step.
ADVANCE_STEP = 10_000
#: How often a worker advances the watermarks and refreshes the lag gauges.
REFRESH_SECONDS = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class Lag:
    """How far a projection is behind the store, and how stale the store's frontier is."""

    lag_events: int
    lag_seconds: float
    horizon_age_seconds: float
    #: Every event at or before it is settled: applied, skipped, or of a halted stream (held).
    watermark: Position = Position.START
    #: Unapplied events per partition (partitions with none are absent).
    partitions: Mapping[int, int] = dataclasses.field(default_factory=dict)
    #: Seconds since the oldest unapplied event of each partition was recorded (partitions with none absent).
    partition_ages: Mapping[int, float] = dataclasses.field(default_factory=dict)




class _Registered(enum.Enum):
    NAMES = "registered"


#: The default of ``event_names``: the handled names of the projection registered under that name (all
#: events when none is registered, or it takes every event).
REGISTERED = _Registered.NAMES
EventNames = Collection[str] | None | _Registered


async def handled_names(pool: db.Pool, projection: str, event_names: EventNames = REGISTERED) -> list[str] | None:
    """The event names the lag of ``projection`` counts (None: every event), sorted. By default the registered
    projection's; one this process does not know (a tool run without the service's modules) is measured by the
    types its read model records (``read_model_types``, what the workers' code applies: workers/rebuild/typebook),
    since its checkpoints stop at its own last event (issue 25)."""
    if event_names is REGISTERED:
        cls = registry.REGISTRY.get(projection)
        if cls is not None:
            event_names = cls.handled_names()
        else:
            async with db.translate_errors():
                recorded = await pool.fetchval(SQL["recorded_types"], projection)
            event_names = None if recorded is None else recorded
    return None if event_names is None else sorted(event_names)


async def current_schema(conn: db.Conn) -> str:
    """The schema the connection's unqualified names resolve to."""
    schema: str = await conn.fetchval("SELECT current_schema()")
    return schema


async def advance(pool: db.Pool, projection: str, *, step: int = ADVANCE_STEP, max_steps: int = 1000,
                  event_names: EventNames = REGISTERED) -> bool:
    """Advance the projection's watermark as far as it may go now; False if another process holds it.
    ``event_names``: the events it handles (None: all; by default the registered projection's)."""
    names = await handled_names(pool, projection, event_names)
    async with db.translate_errors(), pool.acquire() as conn:
        key = locks.watermark(await current_schema(conn), projection)
        for _ in range(max_steps):
            async with conn.transaction():
                if not await locks.try_take(conn, key):
                    return False
                row = await (conn.fetchrow(SQL["advance_watermark"], projection, step) if names is None
                             else conn.fetchrow(SQL["advance_watermark_of"], projection, step, names))
            assert row is not None
            if row["blocked"] or row["scanned"] < step:
                break
    return True


async def count(pool: db.Pool, projection: str, *, event_names: EventNames = REGISTERED,
                ) -> tuple[int, float, Position]:
    """Unapplied committed events, the age of the oldest of them, and the watermark they are counted after."""
    events, seconds, watermark, _, _ = await count_partitions(pool, projection, event_names=event_names)
    return events, seconds, watermark


async def count_partitions(pool: db.Pool, projection: str, *, event_names: EventNames = REGISTERED,
                           ) -> tuple[int, float, Position, dict[int, int], dict[int, float]]:
    """``count``, and per partition the unapplied events and the age of the oldest of them."""
    names = await handled_names(pool, projection, event_names)
    async with db.translate_errors(), pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        # One snapshot: the watermark the tail is counted after is the one returned.
        rows = await (conn.fetch(SQL["measure_lag"], projection) if names is None
                      else conn.fetch(SQL["measure_lag_of"], projection, names))
        mark = await conn.fetchrow(SQL["watermark"], projection)
    assert mark is not None
    by_partition = {r["partition"]: int(r["lag_events"]) for r in rows if r["partition"] is not None}
    ages = {r["partition"]: float(r["lag_seconds"]) for r in rows if r["partition"] is not None}
    return (sum(int(r["lag_events"]) for r in rows), max((float(r["lag_seconds"]) for r in rows), default=0.0),
            Position(mark["watermark_txid"], mark["watermark_position"]), by_partition, ages)


async def horizon_age(pool: db.Pool) -> float:
    """Seconds the oldest open transaction has held back the read_all frontier (0 when none)."""
    async with db.translate_errors():
        age: float = await pool.fetchval(SQL["oldest_transaction_age"])
    return float(age)


async def measure(pool: db.Pool, projection: str, *, event_names: EventNames = REGISTERED) -> Lag:
    """Advance the watermark, then count: the exact lag of ``projection`` now (``event_names`` as in
    ``advance``)."""
    await advance(pool, projection, event_names=event_names)
    events, seconds, watermark, partitions, ages = await count_partitions(pool, projection,
                                                                          event_names=event_names)
    return Lag(events, seconds, await horizon_age(pool), watermark, partitions, ages)


def export(projection: str, lag: Lag, partitions: int | None = None) -> None:
    """Set the lag gauges of the contract (and the horizon's age) from a measurement; with ``partitions``
    (P) also every partition's lag, 0 for those with none."""
    metrics.LAG_EVENTS.labels(projection).set(lag.lag_events)
    if partitions:
        for partition in range(partitions):
            metrics.PARTITION_LAG.labels(projection, str(partition)).set(lag.partitions.get(partition, 0))
    metrics.LAG_SECONDS.labels(projection).set(lag.lag_seconds)
    metrics.HORIZON_AGE.set(lag.horizon_age_seconds)


async def run_lag_monitor(pool: db.Pool, projections: Sequence[str], *,
                          health: health_mod.Health | None = None, partitions: int | None = None,
                          interval: float = REFRESH_SECONDS,
                          measured: Callable[[str, Lag], None] | None = None) -> None:
    """Advance watermarks and refresh the lag gauges every ``interval`` seconds until cancelled;
    ``measured(projection, lag)`` hears each measurement (the worker's catch-up trigger and dedupe).
    The projections are measured side by side, each on a connection of its own: a measurement reads the
    whole tail after the watermark, and a worker far behind waits for the first round to start catching up."""

    async def refresh(projection: str) -> Lag | None:
        try:
            found = await measure(pool, projection)
        except retry.OUTAGE_ERRORS as exc:
            # The consumer reports and retries outages; the gauges just keep their last value.
            if health is not None:
                health.down("postgres", exc)
            logger.debug("lag refresh failed", extra={"projection": projection}, exc_info=True)
            return None
        if health is not None:  # as a tick: a refresh that failed on a lock limit must not leave it down
            health.up("postgres")
        export(projection, found, partitions)
        return found

    while True:
        heard = await asyncio.gather(*(refresh(p) for p in projections))
        if measured is not None:  # after the round: a catch-up then takes every lagging projection at once
            for projection, found in zip(projections, heard, strict=True):
                if found is not None:
                    measured(projection, found)
        await asyncio.sleep(interval)

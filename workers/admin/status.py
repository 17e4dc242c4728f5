"""``eventfleet status [--json]``: per projection state, applied, lag, parked failures, queue depth; the outbox.

Lag comes from ``workers.lag.measure``, the function behind the lag gauges, so the figures equal the
metrics. Queue depth is the message count of a passive declare of the projection's queue (``None`` when
the queue does not exist yet or RabbitMQ is unreachable; the rest is still reported).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika.abc import AbstractConnection

from projections import registry
from store import db, outbox, queries
from workers import broker, locks
from workers.projector import lag

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "ops.sql")
AMQP_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """One projection's row of the report; ``rebuild_running`` is for the table only (it qualifies the state)."""

    name: str
    state: str
    applied: int
    lag_events: int
    lag_seconds: float
    parked: int
    queue_depth: int | None
    halted: int = 0
    rebuild_running: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "applied": self.applied, "lag_events": self.lag_events,
                "lag_seconds": round(self.lag_seconds, 3), "parked": self.parked, "halted": self.halted,
                "queue_depth": self.queue_depth}


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """What ``status`` prints."""

    projections: list[ProjectionStatus]
    outbox_pending: int
    outbox_oldest_age_seconds: float

    def to_json(self) -> dict[str, Any]:
        """The contract's document."""
        return {"projections": [p.to_json() for p in self.projections],
                "outbox": {"pending": self.outbox_pending,
                           "oldest_age_seconds": round(self.outbox_oldest_age_seconds, 3)}}


async def projection_names(pool: db.Pool) -> list[str]:
    """Registered projections and any other with a status row, sorted."""
    async with db.translate_errors():
        rows = await pool.fetch(SQL["known_projections"])
    return sorted(set(registry.load()) | {r["projection"] for r in rows})


async def queue_depths(connection: AbstractConnection | None, prefix: str,
                       projections: Sequence[str]) -> dict[str, int | None]:
    """Messages ready in each projection's queue, by passive declare; None where unknown."""
    depths: dict[str, int | None] = dict.fromkeys(projections)
    if connection is None:
        return depths
    names = broker.Names(prefix)
    for projection in projections:
        declared = await broker.passive_queue(connection, names.queue(projection))
        if declared is not None:
            depths[projection] = declared.message_count
    return depths


async def collect(pool: db.Pool, schema: str, prefix: str, connection: AbstractConnection | None) -> Report:
    """Measure everything the report shows."""
    names = await projection_names(pool)
    depths = await queue_depths(connection, prefix, names)
    rows = []
    for name in names:
        measured = await lag.measure(pool, name)
        async with db.translate_errors():
            row = await pool.fetchrow(SQL["projection_summary"], name)
            assert row is not None
            running = False
            if row["state"] != "live":
                running = await locks.is_held(pool, locks.rebuild(schema, name))
        rows.append(ProjectionStatus(name, row["state"], row["applied"], measured.lag_events, measured.lag_seconds,
                                     row["parked"], depths[name], row["halted"], bool(running)))
    backlog = await outbox.backlog(pool)
    return Report(rows, backlog.pending, backlog.oldest_age_seconds)







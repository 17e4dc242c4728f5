"""``eventfleet retire NAME``: a read model removed from the code, removed from the deployment.

Removing a read model from the code stops its workers, not its queues: they stay bound to the partitions
exchange and fill with every batch the relay publishes, and its checkpoints, status row and recorded types
stay in the schema (``status`` lists it as no longer in the code). ``retire`` deletes its partition queues (their
bindings go with them), its queue from before partitions and its dead-letter queue; then, in one transaction,
its checkpoints, status row, dead letters, leases, recorded types and workers' rows (a reactor's deadlines and
refusals too) and its rebuild shadows; its tables only when asked (``drop_tables``: those its types record).

Refused while the read model is in the loaded code or a live worker runs it: that worker would declare its
queues again and write its checkpoints. The broker goes first: if Postgres then fails, a second run finds the
same read model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import LiteralString, cast

from aio_pika.abc import AbstractConnection

from projections import registry
from store import db, names, queries
from workers import broker, errors, locks
from workers.admin.teardown import KINDS
from workers.rebuild.shadow import shadow_schema

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "retire.sql")
SHADOWS = queries.load("workers", "teardown.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What of one read model exists, so what ``retire`` removes."""

    schema: str
    prefix: str
    projection: str
    queues: tuple[str, ...]
    checkpoints: int
    dead_letters: int
    shadows: tuple[str, ...]
    #: The tables its recorded types name that exist (dropped only with ``drop_tables``); None: none recorded.
    tables: tuple[str, ...] | None
    has_status: bool = False
    deadlines: int = 0
    refusals: int = 0
    leases: int = 0

    @property
    def empty(self) -> bool:
        return not (self.queues or self.checkpoints or self.dead_letters or self.shadows or self.tables
                    or self.has_status or self.deadlines or self.refusals or self.leases or self.tables is not None)

    def describe(self, *, drop_tables: bool) -> list[str]:
        """What goes, one line per kind."""
        lines = []
        if self.queues:
            lines.append(f"queues: {', '.join(self.queues)}")
        lines.append(f"bookkeeping: {self.checkpoints:,} checkpoints, {self.dead_letters:,} dead letters, "
                     f"{self.leases:,} leases, its status row and recorded types"
                     + (f", {self.deadlines:,} deadlines, {self.refusals:,} refusals"
                        if self.deadlines or self.refusals else ""))
        if self.shadows:
            lines.append(f"rebuild shadows: {', '.join(self.shadows)}")
        if drop_tables:
            lines.append(f"tables: {', '.join(self.tables or ()) or 'none found'}")
        elif self.tables:
            lines.append(f"kept (--drop-tables drops them): tables {', '.join(self.tables)}")
        return lines


async def plan(conn: db.Conn, prefix: str, projection: str, amqp: AbstractConnection, *,
               lease_seconds: float) -> Plan:
    """Find what of ``projection`` exists; ``errors.RetireRefused`` while it is in the code or a live worker runs it,
    or when nothing of it exists."""
    names.identifier(projection, what="projection")
    if projection in registry.REGISTRY:
        raise errors.RetireRefused(
            f"read model {projection!r} is in the loaded code (EVENTFLEET_PROJECTION_MODULES, --projection-module): "
            "remove it from the code and deploy the workers without it first; nothing removed")
    schema = await conn.fetchval("SELECT current_schema()")
    async with db.translate_errors():
        running = [r["worker_id"] for r in await conn.fetch(SQL["running"], projection, lease_seconds)]
        if running:
            raise errors.RetireRefused(f"read model {projection!r} is run by live workers {', '.join(running)}: deploy "
                                "the workers without it first (a stopped worker's heartbeat expires within "
                                "EVENTFLEET_LEASE_SECONDS); nothing removed")
        known = await conn.fetchrow(SQL["known"], projection)
        assert known is not None
        partitions = await conn.fetchval(SHADOWS["partitions"]) or 0
        shadows = await _shadows(conn, schema, projection)
        tables: tuple[str, ...] | None = None
        if known["tables"] is not None:
            others = {r["table_name"] for r in await conn.fetch(SQL["other_tables"], projection)}
            others |= {t for cls in registry.REGISTRY.values() for t in cls.tables}
            tables = tuple([t for t in known["tables"]
                            if t not in others and await conn.fetchval(SQL["table_exists"], schema, t)])
    n = broker.Names(prefix)
    candidates = [*(n.partition_queue(projection, i) for i in range(partitions)), n.queue(projection),
                  n.dead_letter_queue(projection)]
    queues = tuple([q for q in candidates if await broker.passive_queue(amqp, q) is not None])
    found = Plan(schema, prefix, projection, queues,
                 known["checkpoints"], known["dead_letters"], shadows, tables, known["status"],
                 known["deadlines"], known["refusals"], known["leases"])
    if found.empty:
        raise errors.RetireRefused(f"schema {schema!r} and prefix {prefix!r} hold nothing of a read model {projection!r}")
    return found


async def _shadows(conn: db.Conn, schema: str, projection: str) -> tuple[str, ...]:
    """The rebuild shadow and verify scratch schemas of ``projection`` that exist (not a deployment's)."""
    own = sorted({shadow_schema(schema, projection, kind) for kind in KINDS})
    return tuple(r["name"] for r in await conn.fetch(SQL["shadows"], own))


def _sql(name: str, **identifiers: str) -> LiteralString:
    statement = SQL[name]
    for key, value in identifiers.items():
        quoted = names.quote(value, max_length=names.MAX_DERIVED_LENGTH)
        statement = cast(LiteralString, statement.replace(f"{{{key}}}", quoted))  # type: ignore[redundant-cast]
    return statement


async def retire(conn: db.Conn, found: Plan, amqp: AbstractConnection, *, drop_tables: bool = False) -> None:
    """Remove what ``found`` lists (its tables only with ``drop_tables``): see the module doc."""
    channel = await amqp.channel()
    try:
        for queue in found.queues:
            await channel.queue_delete(queue)
    finally:
        await channel.close()
    async with db.translate_errors(), conn.transaction():
        await conn.execute(SQL["lock_timeout"])
        await locks.take(conn, locks.migrate(found.schema))  # not while a migrate registers read models
        await locks.take(conn, locks.projection(found.schema, found.projection))  # no batch of it in flight
        await conn.execute(SQL["forget"], found.projection)
        for shadow in found.shadows:
            await conn.execute(_sql("drop_schema", schema=shadow))
        if drop_tables:
            for table in found.tables or ():
                await conn.execute(_sql("drop_table", schema=found.schema, table=table))
    logger.info("read model retired", extra={
        "projection": found.projection, "queues": list(found.queues), "shadows": list(found.shadows),
        "tables_dropped": list(found.tables or ()) if drop_tables else []})


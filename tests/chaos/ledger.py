"""``chaos_ledger``: a test-only projection that counts each stream's events and fails on poisoned ones;
``chaos_shipments``: the same count of one type's events only (a filtered read model).

Loaded into worker processes with ``EVENTFLEET_PROJECTION_MODULES=tests.chaos.ledger`` (importing this
module registers it). It has a handler for every orders event, and only increments, so a count equal to
the store's per-stream count proves each event was applied exactly once. An event listed (unfixed) in
``chaos_poison`` makes it raise: a poison event, parked and halted per the default ``halt`` policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections.base import Projection, handles
from projections.registry import register
from store import db, queries
from store.event_store import RecordedEvent

SQL = queries.load("tests.chaos", "ledger.sql")


class Poisoned(Exception):
    """The chaos harness marked this event as poison: the handler fails until it is fixed."""


@register
class ChaosLedger(Projection):
    """Per stream: how many events were applied."""

    name = "chaos_ledger"
    tables = ("chaos_ledger",)
    ddl = SQL["ddl"]

    @handles(OrderPlaced, OrderPaid, OrderShipped, OrderCancelled)
    async def count(self, conn: db.Conn, event: RecordedEvent) -> None:
        await self.apply_batch(conn, [event])

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Fail if any event is poisoned, else add each stream's events in one statement."""
        if await conn.fetchval(SQL["poisoned"], [e.stream_id for e in events], [e.version for e in events]):
            raise Poisoned(f"poisoned event among {len(events)}")
        counts: dict[str, list[int]] = {}
        for event in events:
            row = counts.setdefault(event.stream_id, [0, -1])
            row[0] += 1
            row[1] = max(row[1], event.version)
        await conn.execute(SQL["count_events"], list(counts), [c[0] for c in counts.values()],
                           [c[1] for c in counts.values()])


@register
class ChaosShipments(Projection):
    """Per stream: how many OrderShipped events were applied. A read model of one type (issue 25): it sees a
    few versions of each stream, far apart, and must still apply each of its events exactly once."""

    name = "chaos_shipments"
    tables = ("chaos_shipments",)
    ddl = SQL["ddl_shipments"]

    @handles(OrderShipped)
    async def count(self, conn: db.Conn, event: RecordedEvent) -> None:
        await self.apply_batch(conn, [event])

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Add each stream's shipments in one statement."""
        counts: dict[str, int] = {}
        for event in events:
            counts[event.stream_id] = counts.get(event.stream_id, 0) + 1
        await conn.execute(SQL["count_shipments"], list(counts), list(counts.values()))

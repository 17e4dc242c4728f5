"""``event_sizes``: a test-only projection that records each applied event's stream, version and data size.

Loaded into relay and worker processes with ``EVENTFLEET_PROJECTION_MODULES=tests.e2e.sizes`` (and migrated
by ``eventfleet migrate`` with it); the test process does not import it, so no other test sees it registered.
It is the only projection of those processes, so the relay declares and fills its queues alone.
"""

from __future__ import annotations

from eventfleet.examples.orders.events import OrderCancelled
from projections.base import Projection, handles
from projections.registry import register
from store import db, queries
from store.event_store import RecordedEvent

SQL = queries.load("tests.e2e", "sizes.sql")


@register
class EventSizes(Projection):
    name = "event_sizes"
    tables = ("event_sizes",)
    ddl = SQL["ddl"]

    @handles(OrderCancelled)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute(SQL["record"], event.stream_id, event.version, len(event.data))

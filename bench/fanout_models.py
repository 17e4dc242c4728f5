"""bench.fanout's one-type read models: each handles only ``OrderShipped``, one row per shipped order.

    EVENTFLEET_PROJECTION_MODULES=eventfleet.examples.orders.projections,bench.fanout_models

Importing this module registers ``fanout_shipped_01`` .. ``fanout_shipped_08`` (scenario b: the example's 2
read models + 8); ``bench.fanout_models_more`` registers ``_09`` .. ``_32`` besides (scenario c: 2 + 32).
Each owns a table of its own name (a rebuild swaps exactly it): ``INSERT ... ON CONFLICT DO NOTHING`` per
shipped order from its handler, one such statement per batch from ``apply_batch``. Their SQL differs only in
the table's name, validated and quoted (the one place names are put into SQL here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, LiteralString

from eventfleet.examples.orders.events import OrderShipped
from projections.base import Projection, handles
from projections.registry import register
from store import db, names
from store.event_store import RecordedEvent

#: The first scenario's read models (this module); the others come from bench.fanout_models_more.
FIRST, COUNT, MORE = 1, 8, 32


def model_name(n: int) -> str:
    """The name (and table) of the n-th one-type read model, 1-based."""
    return f"fanout_shipped_{n:02d}"


class ShippedOnly(Projection):
    """Base of the one-type read models (not registered itself): the shipped orders and their carrier."""

    insert: ClassVar[LiteralString]  # one order: $1 order_id, $2 carrier
    insert_batch: ClassVar[LiteralString]  # many: $1 text[] order ids, $2 text[] carriers

    @handles(OrderShipped)
    async def shipped(self, conn: db.Conn, event: RecordedEvent) -> None:
        e: OrderShipped = event.event
        await conn.execute(self.insert, e.order_id, e.carrier)

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """One statement for the batch's shipped orders (an order ships once: no two rows to merge)."""
        shipped = sorted({e.event.order_id: e.event.carrier for e in events
                          if isinstance(e.event, OrderShipped)}.items())
        if shipped:
            await conn.execute(self.insert_batch, [o for o, _ in shipped], [c for _, c in shipped])


def shipped_model(n: int) -> type[ShippedOnly]:
    """Define and register the n-th one-type read model."""
    table = names.identifier(model_name(n), what="projection")
    quoted = names.quote(table)

    class Shipped(ShippedOnly):
        name = table
        tables = (table,)
        ddl = f"CREATE TABLE IF NOT EXISTS {quoted} (order_id text PRIMARY KEY, carrier text NOT NULL)"
        insert = f"INSERT INTO {quoted} (order_id, carrier) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        insert_batch = (f"INSERT INTO {quoted} (order_id, carrier)"
                        f" SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING")

    Shipped.__name__ = Shipped.__qualname__ = f"Shipped{n:02d}"
    return register(Shipped)


MODELS = [shipped_model(n) for n in range(FIRST, FIRST + COUNT)]

"""``eventfleet status --json`` counts each projection's halted streams, as its table does."""

from __future__ import annotations

import json

from eventfleet.examples.orders.projections import CustomerStats
from store import NO_STREAM
from tests.unit.test_projection_fold import paid, placed
from workers.handlers import Failure
from workers.projector import checkpoints

BOOM = Failure("ValueError: boom", "Traceback (most recent call last):\nValueError: boom\n", 3)


async def test_json_has_the_exact_number_of_halted_streams(event_store, schema, prefix, run_cli):
    for order in ("a", "b", "c"):
        await event_store.append(f"order-{order}", [placed(order, "c"), paid(order, "c")], NO_STREAM)
    events = [e for order in ("a", "b", "c") for e in await event_store.load(f"order-{order}")]
    # customer_stats (policy "halt") parks order-a@1 and order-b@0: two streams halt, order-c applies.
    park = {("order-a", 1): BOOM, ("order-b", 0): BOOM}
    await checkpoints.apply_batch(event_store, CustomerStats(), events, park=park)

    ran = await run_cli("status", "--json", schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    halted = {row["name"]: row["halted"] for row in json.loads(ran.out)["projections"]}
    assert halted == {"customer_stats": 2, "order_summary": 0}

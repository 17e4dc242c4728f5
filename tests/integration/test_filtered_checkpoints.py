"""Exactly-once with gaps in a read model's versions (issue 25 item 3).

A read model that handles a few types sees versions 0, 3, 7 of a stream. Its checkpoint claim returns, from the
store, the versions of its types between the checkpoint and the newest delivered one, so it still tells a gap (a
version of its types it was not given: read from the store) from a duplicate (at or below the checkpoint), and an
event of another type costs it nothing: it is never decoded, applied or checkpointed for it.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Sequence
from typing import Any, LiteralString

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections.base import Projection, handles
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.codec.registry import EVENT_NAME_ATTRIBUTE
from tests.integration.test_worker_checkpoints import payloads_of
from tests.unit.test_projection_fold import paid, placed, shipped
from workers import broker
from workers.projector import checkpoints

TYPES: tuple[type[Any], ...] = (OrderPlaced, OrderPaid, OrderShipped, OrderCancelled)
JOURNAL: LiteralString = ("CREATE TABLE IF NOT EXISTS journal (projection text NOT NULL, stream_id text NOT NULL,"
                          " version bigint NOT NULL, times integer NOT NULL, PRIMARY KEY (projection, stream_id, version))")
RECORD: LiteralString = ("INSERT INTO journal AS j VALUES ($1, $2, $3, 1) ON CONFLICT (projection, stream_id, version)"
                         " DO UPDATE SET times = j.times + 1")


def journal_of(classes: Sequence[type[Any]]) -> Projection:
    """A read model of these event types that records each event it applies, and how often (a double shows)."""

    async def record(self: Projection, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute(RECORD, self.name, event.stream_id, event.version)

    name = "journal_" + "_".join(sorted(c.__name__.lower() for c in classes))
    cls = type(name, (Projection,), {"name": name, "tables": ("journal",), "ddl": JOURNAL,
                                     "record": handles(*classes)(record)})
    projection: Projection = cls()
    return projection


#: Every non-empty subset of the order events' types: the read models a hypothesis example picks from.
SUBSETS = [s for n in range(1, len(TYPES) + 1) for s in itertools.combinations(TYPES, n)]
JOURNALS = [journal_of(s) for s in SUBSETS]


async def append(event_store: EventStore, stream_id: str, payloads: list[Any]) -> list[RecordedEvent]:
    await event_store.append(stream_id, payloads, NO_STREAM)
    return await event_store.load(stream_id)


async def journal(pool: db.Pool, projection: Projection) -> dict[tuple[str, int], int]:
    await pool.execute(JOURNAL)
    rows = await pool.fetch("SELECT stream_id, version, times FROM journal WHERE projection = $1", projection.name)
    return {(r["stream_id"], r["version"]): r["times"] for r in rows}


async def checkpoint_of(pool: db.Pool, projection: Projection, stream_id: str) -> int | None:
    value: int | None = await pool.fetchval(
        "SELECT version FROM checkpoints WHERE projection = $1 AND stream_id = $2", projection.name, stream_id)
    return value


async def test_a_one_type_read_model_applies_its_versions_without_filling_the_others(pool, event_store):
    await pool.execute(JOURNAL)
    e = await append(event_store, "order-f1", [placed("f1", "c"), paid("f1", "c"), shipped("f1", "c"),
                                                paid("f1", "c"), shipped("f1", "c")])
    shipments = journal_of([OrderShipped])
    result = await checkpoints.apply_batch(event_store, shipments, e)
    assert ([x.version for x in result.applied], result.unhandled, result.gaps_filled, result.duplicates) == (
        [2, 4], 3, 0, 0)
    assert await journal(pool, shipments) == {("order-f1", 2): 1, ("order-f1", 4): 1}
    assert await checkpoint_of(pool, shipments, "order-f1") == 4


async def test_a_lost_event_of_its_type_between_delivered_ones_is_read_from_the_store(pool, event_store):
    await pool.execute(JOURNAL)
    e = await append(event_store, "order-f2", [placed("f2", "c"), shipped("f2", "c"), paid("f2", "c"),
                                                shipped("f2", "c"), paid("f2", "c"), shipped("f2", "c")])
    shipments = journal_of([OrderShipped])
    first = await checkpoints.apply_batch(event_store, shipments, [e[1]])
    # Version 3 (a shipment) is lost; 5 arrives: 3 is read from the store, the payments between are not.
    later = await checkpoints.apply_batch(event_store, shipments, [e[5]])
    assert ([x.version for x in first.applied], [x.version for x in later.applied], later.gaps_filled) == (
        [1], [3, 5], 1)
    assert await journal(pool, shipments) == {("order-f2", 1): 1, ("order-f2", 3): 1, ("order-f2", 5): 1}


async def test_a_redelivery_below_the_checkpoint_is_a_duplicate_across_unhandled_versions(pool, event_store):
    await pool.execute(JOURNAL)
    e = await append(event_store, "order-f3", [placed("f3", "c"), paid("f3", "c"), shipped("f3", "c")])
    shipments = journal_of([OrderShipped])
    await checkpoints.apply_batch(event_store, shipments, [e[2]])
    again = await checkpoints.apply_batch(event_store, shipments, e)
    assert (again.applied, again.duplicates, again.unhandled) == ([], 1, 2)
    assert await journal(pool, shipments) == {("order-f3", 2): 1}


async def test_a_batch_of_only_unhandled_events_writes_no_checkpoint(pool, event_store):
    e = await append(event_store, "order-f4", [placed("f4", "c"), paid("f4", "c")])
    shipments = journal_of([OrderShipped])
    result = await checkpoints.apply_batch(event_store, shipments, e)
    assert (result.applied, result.unhandled) == ([], 2)
    assert await checkpoint_of(pool, shipments, "order-f4") is None


async def test_a_batch_message_is_decoded_only_for_the_names_handled(event_store):
    e = await append(event_store, "order-f5", [placed("f5", "c"), paid("f5", "c"), shipped("f5", "c")])
    body = broker.events_message(0, e).body
    whole = broker.from_batch_body(body, event_store.registry)
    mine = broker.from_batch_body(body, event_store.registry, names=frozenset({"OrderShipped"}))
    assert ([x.version for x in whole.events], whole.unhandled) == ([0, 1, 2], 0)
    assert ([x.version for x in mine.events], mine.unhandled) == ([2], 2)


KINDS = st.sampled_from(["paid", "shipped", "cancelled", "placed"])
HISTORY = st.lists(st.tuples(st.integers(0, 2), st.lists(KINDS, max_size=7)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=HISTORY, copies=st.lists(st.integers(0, 3), min_size=32, max_size=32), seed=st.integers(0, 2**32),
       picks=st.lists(st.integers(0, len(JOURNALS) - 1), min_size=1, max_size=3, unique=True),
       set_based=st.booleans())
async def test_random_type_subsets_apply_exactly_the_sequential_model(pool, event_store, history, copies, seed,
                                                                      picks, set_based):
    """Read models of random type subsets, deliveries shuffled, duplicated and dropped, in random batches: each
    applied exactly once every event of its types up to the newest of them delivered per stream (a lost tail
    waits for the next delivery or the store's catch-up), and nothing else."""
    await pool.execute(JOURNAL)
    ex = uuid.uuid4().hex[:8]
    events: list[RecordedEvent] = []
    for i, (customer, kinds) in enumerate(history):
        order_id = f"{ex}-{i}"
        events += await append(event_store, f"order-{order_id}", payloads_of(order_id, f"c{customer}",
                                                                              ["placed", *kinds]))
    counts = copies[:len(events)] + [1] * max(0, len(events) - len(copies))  # 0: every copy is lost
    deliveries = [e for e, n in zip(events, counts, strict=True) for _ in range(n)]
    rng = random.Random(seed)
    rng.shuffle(deliveries)
    models = [JOURNALS[i] for i in picks]
    before = {m.name: await journal(pool, m) for m in models}
    while deliveries:
        size = rng.randint(1, 6)
        batch, deliveries = deliveries[:size], deliveries[size:]
        for model in models:
            await checkpoints.apply_batch(event_store, model, batch, set_based=set_based)
    for model, subset in zip(models, (SUBSETS[i] for i in picks), strict=True):
        names = {getattr(c, EVENT_NAME_ATTRIBUTE) for c in subset}
        mine = [e for e in events if e.event_type.rpartition(".v")[0] in names]
        newest: dict[str, int] = {}
        for e, n in zip(events, counts, strict=True):
            if n and e in mine:
                newest[e.stream_id] = max(e.version, newest.get(e.stream_id, -1))
        expected = {(e.stream_id, e.version): 1 for e in mine if e.version <= newest.get(e.stream_id, -1)}
        got = {k: v for k, v in (await journal(pool, model)).items() if k not in before[model.name]}
        assert got == expected, model.name

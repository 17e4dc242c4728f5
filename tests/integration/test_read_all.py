"""read_all never skips an event, even one whose transaction took a smaller position and committed later.

Other tests share this Postgres cluster, and any writing transaction anywhere holds the read_all frontier
back (that is the documented cost), so these tests poll with a deadline instead of expecting events at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from eventfleet.examples.orders.events import OrderPaid
from store import (
    NO_STREAM,
    CorruptEvent,
    EventSchemaMismatch,
    EventStore,
    Position,
    RecordedEvent,
    UnknownEventType,
    codec,
    db,
)
from store import event_store as event_store_module
from store.partitions import DEFAULT_PARTITIONS, partition_of
from tests.conftest import DATABASE_URL
from tests.unit.test_projection_fold import cancelled

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def paid(n: int) -> OrderPaid:
    return OrderPaid(f"o{n}", "c1", Decimal(n), NOW)


async def read_until(store: EventStore, after: Position, done: Callable[[list[RecordedEvent]], bool],
                     within: float = 60) -> list[RecordedEvent]:
    """Keep reading after ``after`` (as a relay of cursors would) until ``done(everything read)``."""
    read: list[RecordedEvent] = []
    deadline = asyncio.get_running_loop().time() + within
    while not done(read):
        assert asyncio.get_running_loop().time() < deadline, f"read only {[e.stream_id for e in read]}"
        page = await store.read_all(after, limit=50)
        if page:
            read.extend(page)
            after = page[-1].position
        else:
            await asyncio.sleep(0.01)
    return read


async def insert_in(store: EventStore, conn: db.Conn, stream_id: str, n: int) -> int:
    """Insert one event with the store's own statement inside the caller's open transaction."""
    _, data = codec.REGISTRY.encode(paid(n))
    row = await conn.fetchrow(store.queries["append_event"], stream_id, NO_STREAM, uuid.uuid4(), "OrderPaid.v1",
                              data, codec.packb({}), partition_of(stream_id, DEFAULT_PARTITIONS))
    assert row is not None
    return int(row["positions"][0])


async def test_an_event_committed_late_with_a_smaller_position_is_not_skipped(event_store, schema):
    early, late = await db.connect(DATABASE_URL, schema), await db.connect(DATABASE_URL, schema)
    try:
        e_tx, l_tx = early.transaction(), late.transaction()
        await e_tx.start()
        e_xid = await early.fetchval("SELECT pg_current_xact_id()")  # E takes its transaction id first
        await l_tx.start()
        l_position = await insert_in(event_store, late, "late", 1)  # L inserts first: the smaller position
        e_position = await insert_in(event_store, early, "early", 2)
        assert l_position < e_position
        await e_tx.commit()

        first = await read_until(event_store, Position.START, lambda read: any(e.stream_id == "early" for e in read))
        assert [e.stream_id for e in first] == ["early"]  # L has not committed: not visible yet
        cursor = first[-1].position
        assert cursor == Position(e_xid, e_position)
        # A cursor on the bare global position would now stand past L's position and lose it.
        assert l_position < cursor.global_position

        await l_tx.commit()
        after = await read_until(event_store, cursor, lambda read: len(read) >= 1)
        assert [(e.stream_id, e.global_position) for e in after] == [("late", l_position)]
        assert after[0].position > cursor
    finally:
        await early.close()
        await late.close()


async def test_an_open_older_transaction_holds_read_all_back_until_it_ends(event_store, schema):
    holder = await db.connect(DATABASE_URL, schema)
    try:
        tx = holder.transaction()
        await tx.start()
        held_xid = await holder.fetchval("SELECT pg_current_xact_id()")
        await event_store.append("s", [paid(1)], NO_STREAM)  # committed, but by a younger transaction
        assert await event_store.read_all() == []
        horizon = await event_store.horizon()
        assert horizon.xmin <= held_xid
        assert horizon.oldest_transaction_age_seconds > 0
        await tx.commit()
    finally:
        await holder.close()
    assert [e.stream_id for e in await read_until(event_store, Position.START, lambda r: len(r) >= 1)] == ["s"]


@pytest.mark.parametrize(("event_type", "data", "error"), [
    ("Nope.v1", codec.packb({}), UnknownEventType),
    ("OrderPaid.v9", codec.packb({}), UnknownEventType),
    ("OrderPaid.v1", b"\xc1\xc1", CorruptEvent),
    ("OrderPaid.v1", codec.packb({"order_id": 1}), EventSchemaMismatch),
])
async def test_undecodable_events_raise_a_typed_error_naming_stream_version_and_type(
        event_store, pool, event_type, data, error):
    await event_store.append("good", [paid(1)], NO_STREAM)
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)"
                       " VALUES ($1, 'bad-stream', 0, $2, $3, $4)", uuid.uuid4(), event_type, data, codec.packb({}))
    with pytest.raises(error, match=rf"stream 'bad-stream', version 0, type {event_type}"):
        await event_store.load("bad-stream")
    with pytest.raises(error, match="bad-stream"):
        await read_until(event_store, Position.START, lambda read: len(read) >= 2)


async def test_a_large_read_lets_other_tasks_run_between_slices_of_decoding(event_store, monkeypatch):
    await event_store.append("order-big", [paid(n) for n in range(300)], NO_STREAM)
    await read_until(event_store, Position.START, lambda found: len(found) == 300)
    trace: list[str] = []
    decode = event_store_module.record_from_row

    def traced(row: Any, registry: codec.Registry) -> RecordedEvent:
        trace.append("d")
        return decode(row, registry)

    monkeypatch.setattr(event_store_module, "record_from_row", traced)

    async def other_task() -> None:
        while True:
            trace.append("t")
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    try:
        await event_store.read_all(limit=300)
    finally:
        other.cancel()
    runs = [len(run) for run in "".join(trace).split("t") if run]

    assert runs == [event_store_module.DECODE_SLICE, event_store_module.DECODE_SLICE,
                    300 - 2 * event_store_module.DECODE_SLICE]



async def big_events_in_partition_0(store: EventStore, n: int, size: int) -> list[RecordedEvent]:
    """Append ``n`` events of about ``size`` bytes to streams of partition 0; return them once readable."""
    partitions = await store.partitions()
    streams = [s for s in (f"s{i}" for i in range(100 * n)) if partition_of(s, partitions) == 0][:n]
    await store.append_batch([(s, [cancelled(s, "c", "x" * size)], NO_STREAM) for s in streams])
    deadline = asyncio.get_running_loop().time() + 60
    while len(events := await store.read_partition(0, limit=1000)) < n:  # an old transaction elsewhere holds them
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    return events


async def test_a_partition_read_stops_at_the_event_that_reaches_its_byte_budget(event_store) -> None:
    stored = await big_events_in_partition_0(event_store, 10, 10_000)
    sizes = [len(e.data) + len(codec.packb(e.metadata)) for e in stored]

    events = await event_store.read_partition(0, limit=100, max_bytes=sum(sizes[:2]) + 1)

    assert [e.event_id for e in events] == [e.event_id for e in stored[:3]]
    assert events.full


async def test_a_partition_read_returns_one_event_bigger_than_its_byte_budget(event_store) -> None:
    await big_events_in_partition_0(event_store, 3, 10_000)

    events = await event_store.read_partition(0, limit=100, max_bytes=1)

    assert len(events) == 1
    assert events.full


async def test_a_partition_read_that_reaches_the_tail_within_its_limits_is_not_full(event_store) -> None:
    await big_events_in_partition_0(event_store, 3, 100)

    events = await event_store.read_partition(0, limit=100, max_bytes=1024 * 1024)

    assert len(events) == 3
    assert not events.full

"""Appends on every store: versions, positions, ids and metadata, batches."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from domain.events import OrderPaid
from store import NO_STREAM, InvalidInput, NewEvent

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def paid(n: int = 1) -> OrderPaid:
    return OrderPaid(f"o{n}", "c1", Decimal(n), NOW)


async def test_events_without_ids_get_distinct_ones_from_the_store(event_store):
    await event_store.append("s", [paid(1), paid(2)], NO_STREAM)
    await event_store.append("s", [paid(3)], 1)
    await event_store.append_batch([("t", [paid(4), NewEvent(paid(5))], NO_STREAM)])
    ids = [e.event_id for s in "st" for e in await event_store.load(s)]
    assert len(set(ids)) == 5
    assert all(i.version == 4 for i in ids)


async def test_new_event_keeps_its_id_and_metadata(event_store):
    event_id = uuid.uuid4()
    await event_store.append("s", [NewEvent(paid(), event_id, {"correlation_id": "abc", "n": 1})], NO_STREAM)
    (loaded,) = await event_store.load("s")
    assert loaded.event_id == event_id
    assert loaded.metadata == {"correlation_id": "abc", "n": 1}
    assert loaded.event_type == "OrderPaid.v1"
    assert loaded.recorded_at.tzinfo is not None


async def test_append_batch_refuses_an_empty_batch_and_a_stream_twice(event_store):
    with pytest.raises(InvalidInput):
        await event_store.append_batch([])
    with pytest.raises(InvalidInput):
        await event_store.append_batch([("a", [paid(1)], NO_STREAM), ("a", [paid(2)], 0)])


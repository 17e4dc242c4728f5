"""Appends on every store: versions, positions, ids and metadata, batches."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from eventfleet.examples.orders.events import OrderPaid
from store import (
    NO_STREAM,
    REGISTRY,
    CodecError,
    DuplicateEventId,
    InvalidInput,
    NewEvent,
    PayloadTooLarge,
    VersionConflict,
)

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def paid(n: int = 1) -> OrderPaid:
    return OrderPaid(f"o{n}", "c1", Decimal(n), NOW)


async def test_append_writes_versions_and_positions(event_store):
    first = await event_store.append("order-1", [paid(1), paid(2)], NO_STREAM)
    second = await event_store.append("order-1", [paid(3)], 1)
    assert (first.stream_id, first.first_version, first.last_version) == ("order-1", 0, 1)
    assert (second.first_version, second.last_version) == (2, 2)
    positions = [*first.global_positions, *second.global_positions]
    assert positions == sorted(positions)
    assert len(set(positions)) == 3
    loaded = await event_store.load("order-1")
    assert [(e.version, e.global_position, e.event) for e in loaded] == [
        (0, positions[0], paid(1)), (1, positions[1], paid(2)), (2, positions[2], paid(3))]
    assert [e.version for e in await event_store.load("order-1", from_version=2)] == [2]
    assert await event_store.stream_version("order-1") == 2
    assert await event_store.stream_version("order-none") == NO_STREAM


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


@pytest.mark.parametrize(("expected", "actual"), [(NO_STREAM, 0), (5, 0), (0, NO_STREAM)])
async def test_a_wrong_expected_version_raises_version_conflict_and_writes_nothing(
        event_store, written, expected, actual):
    if actual == 0:
        await event_store.append("s", [paid()], NO_STREAM)
    before = await written()
    with pytest.raises(VersionConflict) as info:
        await event_store.append("s" if actual == 0 else "empty", [paid(2)], expected)
    assert (info.value.expected, info.value.actual) == (expected, actual)
    assert info.value.stream_id == ("s" if actual == 0 else "empty")
    assert await written() == before


async def test_retrying_an_append_returns_the_original_result_and_writes_nothing(event_store, written):
    events = [NewEvent(paid(1), uuid.uuid4()), NewEvent(paid(2), uuid.uuid4())]
    original = await event_store.append("s", events, NO_STREAM)
    await event_store.append("s", [paid(3)], 1)  # the stream moved on since
    assert await event_store.append("s", events, NO_STREAM) == original
    single = NewEvent(paid(4), uuid.uuid4())
    again = await event_store.append("t", [single], NO_STREAM)
    assert await event_store.append("t", [single], NO_STREAM) == again
    assert await written() == 4


@pytest.mark.parametrize(("stream_id", "payloads", "expected"), [
    ("t", [paid(2)], NO_STREAM),  # another stream
    ("s", [paid(2)], 1),  # another version
    ("s", [paid(1), paid(9)], NO_STREAM),  # the same place, other content
])
async def test_the_same_event_id_at_another_place_is_a_clear_error(event_store, written, stream_id, payloads, expected):
    first_id, second_id = uuid.uuid4(), uuid.uuid4()
    await event_store.append("s", [NewEvent(paid(1), first_id), NewEvent(paid(2), second_id)], NO_STREAM)
    before = await written()
    retry = [NewEvent(p, i) for p, i in zip(payloads, [first_id, second_id][-len(payloads):], strict=True)]
    with pytest.raises(DuplicateEventId):
        await event_store.append(stream_id, retry, expected)
    assert await written() == before


async def test_one_event_id_twice_in_one_append_is_refused(event_store, written):
    event_id = uuid.uuid4()
    with pytest.raises(DuplicateEventId):
        await event_store.append("s", [NewEvent(paid(1), event_id), NewEvent(paid(2), event_id)], NO_STREAM)
    assert await written() == 0


async def test_append_batch_writes_every_stream_in_one_go(event_store, written):
    await event_store.append("a", [paid(1)], NO_STREAM)
    results = await event_store.append_batch([("a", [paid(2), paid(3)], 0), ("b", [paid(4)], NO_STREAM)])
    assert [(r.stream_id, r.first_version, r.last_version, len(r.global_positions)) for r in results] == [
        ("a", 1, 2, 2), ("b", 0, 0, 1)]
    loaded = {e.global_position: (e.stream_id, e.version) for s in "ab" for e in await event_store.load(s)}
    assert [loaded[p] for r in results for p in r.global_positions] == [("a", 1), ("a", 2), ("b", 0)]
    assert await written() == 4


async def test_append_batch_is_all_or_nothing(event_store, written):
    await event_store.append("a", [paid(1)], NO_STREAM)
    before = await written()
    with pytest.raises(VersionConflict) as info:
        await event_store.append_batch([("b", [paid(2)], NO_STREAM), ("a", [paid(3)], NO_STREAM),
                                        ("c", [paid(4)], NO_STREAM)])
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("a", NO_STREAM, 0)
    assert await written() == before
    taken = (await event_store.load("a"))[0].event_id
    with pytest.raises(DuplicateEventId):  # a clash of event ids, not of versions
        await event_store.append_batch([("b", [paid(2)], NO_STREAM), ("c", [NewEvent(paid(3), taken)], NO_STREAM)])
    assert await written() == before


async def test_retrying_a_batch_returns_the_original_results(event_store, written):
    batch = [("a", [NewEvent(paid(1), uuid.uuid4())], NO_STREAM), ("b", [NewEvent(paid(2), uuid.uuid4())], NO_STREAM)]
    original = await event_store.append_batch(batch)
    assert await event_store.append_batch(batch) == original
    assert await written() == 2


async def test_payloads_over_the_limit_are_refused_default_one_mebibyte(event_store, new_store):
    assert event_store.max_payload_bytes == 1024 * 1024
    big = OrderPaid("o", "c" * (1024 * 1024), Decimal(1), NOW)
    with pytest.raises(PayloadTooLarge, match="over the 1048576 limit"):
        await event_store.append("s", [big], NO_STREAM)
    small_limit = new_store(max_payload_bytes=200)
    with pytest.raises(PayloadTooLarge):
        await small_limit.append("s", [NewEvent(paid(), metadata={"pad": "x" * 200})], NO_STREAM)
    await small_limit.append("s", [paid()], NO_STREAM)
    assert await small_limit.stream_version("s") == 0


async def test_a_loaded_event_is_decoded_from_the_stored_bytes_not_the_appended_object(event_store):
    appended = paid(7)
    await event_store.append("s", [appended], NO_STREAM)
    (loaded,) = await event_store.load("s")
    assert loaded.data == REGISTRY.encode(appended)[1]
    assert loaded.event == appended
    assert loaded.event is not appended


async def test_an_event_the_codec_cannot_encode_is_refused_and_nothing_is_written(event_store, written):
    naive = OrderPaid("o1", "c1", Decimal(1), dt.datetime(2024, 5, 1, 12, 0))
    with pytest.raises(CodecError, match="naive datetime"):
        await event_store.append("s", [paid(1), naive], NO_STREAM)
    assert await written() == 0

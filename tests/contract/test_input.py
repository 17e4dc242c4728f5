"""What every store refuses, before any I/O, and with which typed error; and stream ids that round-trip."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders.events import OrderPaid
from store import NO_STREAM, InvalidInput, InvalidStreamId, Store, errors, names
from tests.contract.conftest import StoreFactory, Written
from tests.contract.test_appends import paid

NOW = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
PAID = OrderPaid("o", "c", Decimal("1.25"), NOW)


async def round_trip(event_store: Store, stream_id: str) -> None:
    version = await event_store.stream_version(stream_id)
    result = await event_store.append(stream_id, [PAID], version)
    assert result.stream_id == stream_id
    loaded = await event_store.load(stream_id)
    assert [e.stream_id for e in loaded] == [stream_id] * (version + 2)
    assert loaded[-1].event == PAID


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream_id=st.text(min_size=1, max_size=300))
async def test_any_text_stream_id_round_trips_or_is_refused(event_store: Store, stream_id: str) -> None:
    try:
        names.stream_id(stream_id)
    except errors.InvalidStreamId:
        with pytest.raises(errors.InvalidStreamId):
            await event_store.append(stream_id, [PAID], NO_STREAM)
        return
    await round_trip(event_store, stream_id)


@pytest.mark.parametrize("stream_id", ["a\x00b", "\x00", "x" * 10_000, "x" * 256, "", "\ud800x", "tab\there",
                                       "\u202eevil"])
async def test_nul_and_over_long_stream_ids_are_refused_and_nothing_is_written(
        event_store: Store, written: Written, stream_id: str) -> None:
    with pytest.raises(errors.InvalidStreamId):
        await event_store.append(stream_id, [PAID], NO_STREAM)
    with pytest.raises(errors.InvalidStreamId):
        await event_store.append_batch([("order-ok", [PAID], NO_STREAM), (stream_id, [PAID], NO_STREAM)])
    assert await written() == 0


async def test_an_oversized_event_is_refused_and_nothing_is_written(new_store: StoreFactory) -> None:
    store = new_store(max_payload_bytes=4096)
    big = OrderPaid("o" * 10_000, "c", Decimal(1), NOW)
    with pytest.raises(errors.PayloadTooLarge):
        await store.append("order-big", [PAID, big], NO_STREAM)
    assert await store.stream_version("order-big") == NO_STREAM


@pytest.mark.parametrize("expected", [-2, -(10**6), 2**62, 2**63, 2**64, 10**30, "0", 0.0, None, True, Decimal(0)])
async def test_bad_expected_versions_are_refused(event_store: Store, expected: Any) -> None:
    await event_store.append("order-1", [PAID], NO_STREAM)
    with pytest.raises(errors.InvalidExpectedVersion):
        await event_store.append("order-1", [PAID], expected)
    assert await event_store.stream_version("order-1") == 0


async def test_a_huge_valid_expected_version_is_a_conflict_not_a_crash(event_store: Store) -> None:
    await event_store.append("order-1", [PAID], NO_STREAM)
    with pytest.raises(errors.VersionConflict) as info:
        await event_store.append("order-1", [PAID], 2**62 - 1)
    assert (info.value.expected, info.value.actual) == (2**62 - 1, 0)



@pytest.mark.parametrize(("stream_id", "events", "error"), [
    ("", [paid()], InvalidStreamId),
    ("x" * 256, [paid()], InvalidStreamId),
    ("s", [], InvalidInput),
    ("s", (), InvalidInput),
])
async def test_bad_input_is_refused_before_the_database(offline, stream_id, events, error):
    store = offline()
    with pytest.raises(error):
        await store.append(stream_id, events, NO_STREAM)
    with pytest.raises(error):
        await store.append_batch([(stream_id, events, NO_STREAM)])


@pytest.mark.parametrize("bad", [-1, 2**62, 1.0, "0", True, None])
async def test_reads_refuse_a_version_or_limit_that_is_not_a_small_non_negative_int_before_the_database(
        offline, bad):
    store = offline()
    with pytest.raises(InvalidInput, match="from_version must be an int >= 0"):
        await store.load("s", from_version=bad)
    with pytest.raises(InvalidInput, match="version must be an int >= 0"):
        await store.save_snapshot("s", bad, paid())
    if bad != 2**62:  # a huge limit is fine
        with pytest.raises(InvalidInput, match="limit must be an int >= 1"):
            await store.read_all(limit=bad)



@pytest.mark.parametrize("expected", [-2, -(2**63), 2**62, 2**63, 2**64, 10**100, True, False, None, "0", 1.0,
                                      Decimal(0), [0]])
async def test_bad_expected_versions_are_refused_before_the_database(offline: StoreFactory, expected: Any) -> None:
    store = offline()
    with pytest.raises(errors.InvalidExpectedVersion):
        await store.append("order-1", [PAID], expected)
    with pytest.raises(errors.InvalidExpectedVersion):
        await store.append_batch([("order-1", [PAID], expected)])


@pytest.mark.parametrize("stream_id", ["", "a\x00b", "x" * 10_000, "\ud800", 12])
async def test_bad_stream_ids_are_refused_before_the_database(offline: StoreFactory, stream_id: Any) -> None:
    store = offline()
    with pytest.raises(errors.InvalidStreamId):
        await store.append(stream_id, [PAID], NO_STREAM)
    with pytest.raises(errors.InvalidStreamId):
        await store.append_batch([(stream_id, [PAID], NO_STREAM)])
    with pytest.raises(errors.InvalidStreamId):
        await store.load(stream_id)


@pytest.mark.parametrize("events", [[], "abc", b"abc", None, [object()], [{"a": 1}]])
async def test_bad_event_lists_are_typed_errors(offline: StoreFactory, events: Any) -> None:
    store = offline()
    with pytest.raises(errors.EventFleetError):
        await store.append("order-1", events, NO_STREAM)


async def test_an_oversized_event_is_refused_before_the_database(offline: StoreFactory) -> None:
    store = offline(max_payload_bytes=1024)
    with pytest.raises(errors.PayloadTooLarge):
        await store.append("order-1", [OrderPaid("o" * 2000, "c", Decimal(1), PAID.paid_at)], NO_STREAM)


async def test_a_misfitting_event_is_refused_before_the_database(offline: StoreFactory) -> None:
    store = offline()
    misfit = OrderPaid("o", "c", 1.5, PAID.paid_at)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidEvent, match=r"^OrderPaid\.amount: expected Decimal, got float$"):
        await store.append("order-1", [PAID, misfit], NO_STREAM)
    with pytest.raises(errors.InvalidEvent, match=r"^OrderPaid\.amount: expected Decimal, got float$"):
        await store.append_batch([("order-1", [PAID], NO_STREAM), ("order-2", [misfit], NO_STREAM)])

"""Time travel on every store: a stream's events up to a version, its version as of a time, its snapshot at
or before a version."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from store import NO_STREAM, InvalidInput
from tests.contract.counters import CounterState
from tests.contract.test_appends import paid

MICROSECOND = dt.timedelta(microseconds=1)
NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


async def one_by_one(store: Any, count: int, stream_id: str = "s") -> list[dt.datetime]:
    """Append ``count`` events to the stream, one append each; the times they were recorded at."""
    for version in range(count):
        await store.append(stream_id, [paid(version)], version - 1)
    return [e.recorded_at for e in await store.load(stream_id)]


# --- the store ---------------------------------------------------------------------------------------

async def test_load_up_to_a_version_includes_it(event_store):
    await event_store.append("s", [paid(n) for n in range(5)], NO_STREAM)
    assert [e.version for e in await event_store.load("s", 1, 3)] == [1, 2, 3]


async def test_load_up_to_a_version_past_the_end_returns_the_events_there_are(event_store):
    await event_store.append("s", [paid(n) for n in range(5)], NO_STREAM)
    assert [e.version for e in await event_store.load("s", 3, 10)] == [3, 4]


async def test_load_up_to_a_version_below_from_version_returns_nothing(event_store):
    await event_store.append("s", [paid(n) for n in range(5)], NO_STREAM)
    assert await event_store.load("s", 3, 2) == []


@pytest.mark.parametrize("bad", [-1, 2**62, 1.0, "0", True])
async def test_load_refuses_a_to_version_that_is_not_a_small_non_negative_int_before_any_io(offline, bad):
    with pytest.raises(InvalidInput, match="to_version must be an int >= 0"):
        await offline().load("s", 0, bad)


async def test_the_version_at_a_time_is_the_last_one_recorded_at_or_before_it(event_store):
    times = await one_by_one(event_store, 3)
    assert [await event_store.version_at("s", t) for t in times] == [0, 1, 2]
    assert await event_store.version_at("s", times[2] - MICROSECOND) == 1


async def test_the_version_at_a_time_compares_instants_not_wall_clock_readings(event_store):
    times = await one_by_one(event_store, 3)
    new_york = dt.timezone(dt.timedelta(hours=-5))
    assert await event_store.version_at("s", times[1].astimezone(new_york)) == 1


async def test_the_version_at_a_time_before_the_first_event_is_no_stream(event_store):
    times = await one_by_one(event_store, 2)
    assert await event_store.version_at("s", times[0] - MICROSECOND) == NO_STREAM


async def test_the_version_at_a_time_of_a_stream_that_does_not_exist_is_no_stream(event_store):
    assert await event_store.version_at("none", NOW) == NO_STREAM


@pytest.mark.parametrize("bad", [dt.datetime(2024, 5, 1, 12, 0), dt.date(2024, 5, 1), "2024-05-01T12:00Z", None])
async def test_version_at_refuses_a_time_that_is_not_timezone_aware_before_any_io(offline, bad):
    with pytest.raises(InvalidInput, match="as_of must be a timezone-aware datetime"):
        await offline().version_at("s", bad)


async def test_the_snapshot_at_or_before_a_version_is_one_not_newer_than_it(counters):
    await counters.save_snapshot("c", 5, CounterState(6))
    found = [await counters.load_snapshot("c", at_or_before=v) for v in (5, 9)]
    assert [(s.version, s.state) for s in found] == [(5, CounterState(6)), (5, CounterState(6))]


async def test_there_is_no_snapshot_at_or_before_a_version_older_than_the_newest_one(counters):
    await counters.save_snapshot("c", 5, CounterState(6))
    assert await counters.load_snapshot("c", at_or_before=4) is None


@pytest.mark.parametrize("bad", [-1, 2**62, 1.0, "0", True])
async def test_load_snapshot_refuses_an_at_or_before_that_is_not_a_small_non_negative_int_before_any_io(
        offline, bad):
    with pytest.raises(InvalidInput, match="at_or_before must be an int >= 0"):
        await offline().load_snapshot("s", at_or_before=bad)

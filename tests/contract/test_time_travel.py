"""Time travel on every store: a stream's events up to a version, its version as of a time, its snapshot at
or before a version, and ``Repository.load`` of the aggregate as it was."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from store import NO_STREAM, BeforeStreamStart, InvalidInput, Repository, StreamNotFound, VersionBeyondEnd
from tests.contract.counters import REG, Counter, CounterState, increment
from tests.contract.test_appends import paid

MICROSECOND = dt.timedelta(microseconds=1)
NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


async def one_by_one(store: Any, count: int, stream_id: str = "s") -> list[dt.datetime]:
    """Append ``count`` events to the stream, one append each; the times they were recorded at."""
    for version in range(count):
        await store.append(stream_id, [paid(version)], version - 1)
    return [e.recorded_at for e in await store.load(stream_id)]


async def counted(counters: Any, count: int) -> list[dt.datetime]:
    """Increment counter "c" ``count`` times (no snapshots); the times its events were recorded at."""
    repository = Repository(counters, Counter)
    for writer in range(count):
        await repository.execute("c", increment(writer))
    return [e.recorded_at for e in await counters.load("c")]


async def counted_with_a_false_snapshot(counters: Any) -> list[dt.datetime]:
    """``counted(counters, 6)`` and a snapshot at version 3 that disagrees with the events (count 1000):
    only a load that starts from it counts from 1000."""
    times = await counted(counters, 6)
    await counters.save_snapshot("c", 3, CounterState(1000))
    return times


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


# --- the repository ----------------------------------------------------------------------------------

async def test_the_repository_loads_the_aggregate_at_a_version(counters):
    await counted(counters, 5)
    loaded = await Repository(counters, Counter).load("c", version=2)
    assert (loaded.version, loaded.count) == (2, 3)


async def test_the_repository_loads_the_aggregate_as_of_the_time_an_event_was_recorded(counters):
    times = await counted(counters, 5)
    loaded = await Repository(counters, Counter).load("c", as_of=times[2])
    assert (loaded.version, loaded.count) == (2, 3)


async def test_as_of_a_time_between_two_events_the_aggregate_has_only_the_earlier(counters):
    times = await counted(counters, 5)
    loaded = await Repository(counters, Counter).load("c", as_of=times[3] - MICROSECOND)
    assert (loaded.version, loaded.count) == (2, 3)


async def test_loading_a_version_starts_from_the_snapshot_when_it_is_not_newer(counters):
    await counted_with_a_false_snapshot(counters)
    loaded = await Repository(counters, Counter, snapshot_every=3).load("c", version=4)
    assert (loaded.version, loaded.count) == (4, 1001)


async def test_loading_as_of_a_time_starts_from_the_snapshot_when_it_is_not_newer(counters):
    times = await counted_with_a_false_snapshot(counters)
    loaded = await Repository(counters, Counter, snapshot_every=3).load("c", as_of=times[5])
    assert (loaded.version, loaded.count) == (5, 1002)


async def test_loading_a_version_older_than_the_snapshot_replays_the_stream_from_the_start(counters):
    await counted_with_a_false_snapshot(counters)
    loaded = await Repository(counters, Counter, snapshot_every=3).load("c", version=2)
    assert (loaded.version, loaded.count) == (2, 3)


@pytest.mark.parametrize("snapshot_every", [None, 2])
async def test_a_version_beyond_the_end_of_the_stream_raises_version_beyond_end(counters, snapshot_every):
    repository = Repository(counters, Counter, snapshot_every=snapshot_every)
    for writer in range(3):
        await repository.execute("c", increment(writer))
    with pytest.raises(VersionBeyondEnd) as info:
        await repository.load("c", version=3)
    assert (info.value.stream_id, info.value.version, info.value.last_version) == ("c", 3, 2)


async def test_a_time_before_the_first_event_raises_before_stream_start(counters):
    times = await counted(counters, 2)
    with pytest.raises(BeforeStreamStart) as info:
        await Repository(counters, Counter).load("c", as_of=times[0] - MICROSECOND)
    assert (info.value.stream_id, info.value.as_of) == ("c", times[0] - MICROSECOND)


@pytest.mark.parametrize("when", [{"version": 0}, {"as_of": NOW}])
async def test_a_version_or_time_of_a_stream_that_does_not_exist_raises_stream_not_found(counters, when):
    with pytest.raises(StreamNotFound) as info:
        await Repository(counters, Counter).load("none", **when)
    assert info.value.stream_id == "none"


async def test_a_plain_load_of_a_stream_that_does_not_exist_is_a_new_aggregate(counters):
    loaded = await Repository(counters, Counter).load("none")
    assert (loaded.version, loaded.count) == (NO_STREAM, 0)


async def test_the_repository_refuses_both_a_version_and_a_time_before_any_io(offline):
    with pytest.raises(InvalidInput, match="a version or a time"):
        await Repository(offline(registry=REG), Counter).load("c", version=1, as_of=NOW)


@pytest.mark.parametrize("bad", [-1, 2**62, 1.0, "0", True])
async def test_the_repository_refuses_a_version_that_is_not_a_small_non_negative_int_before_any_io(offline, bad):
    with pytest.raises(InvalidInput, match="version must be an int >= 0"):
        await Repository(offline(registry=REG), Counter).load("c", version=bad)

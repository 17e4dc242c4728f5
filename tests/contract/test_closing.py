"""Closing and archiving streams on every store (``store.archive``): appends refused after the close, the events
moved out with an audit entry and a tombstone, versions and read_all consistent after, personal fields too.

What only PostgreSQL has (the outbox and halted projections that refuse an archival, the triggers, the command
line, the read models) is in tests/integration/test_archive.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from store import ERASED, NO_STREAM, NewEvent, Position, archive, errors
from store.codec.closing import StreamArchived, StreamClosed
from tests.contract.personal import KEKS, REG, registered
from tests.contract.test_appends import paid
from tests.integration.test_read_all import read_until

Publish = Callable[[], Awaitable[None]]


@pytest.fixture
def publish(kind: str, request: pytest.FixtureRequest) -> Publish:
    """What the relay does once the broker confirmed: PostgreSQL's outbox rows go (memory has no outbox)."""
    if kind == "memory":
        async def nothing() -> None:
            return None

        return nothing
    pool = request.getfixturevalue("pool")

    async def delete() -> None:
        await pool.execute("DELETE FROM outbox")

    return delete


async def closed_stream(event_store, publish: Publish, stream_id: str = "s1") -> str:
    """stream_id with three events and a StreamClosed (version 3), published."""
    await event_store.append(stream_id, [paid(1), paid(2), paid(3)], NO_STREAM)
    await archive.close(event_store, stream_id, reason="delivered")
    await publish()
    return stream_id


async def archive_it(event_store, stream_id: str) -> archive.ArchiveEntry:
    return await archive.archive(event_store, stream_id, archived_by="ops@example", reason="retention: 7 years")


# --- closing ---------------------------------------------------------------------------------------------


async def test_closing_appends_stream_closed_at_the_streams_end(event_store):
    await event_store.append("s1", [paid(1), paid(2)], NO_STREAM)
    assert await archive.close(event_store, "s1", reason="delivered") == 2
    last = (await event_store.load("s1"))[-1]
    assert (last.version, last.event) == (2, StreamClosed("delivered"))


@pytest.mark.parametrize("expected", [1, 0, NO_STREAM])
async def test_an_append_to_a_closed_stream_is_refused_with_stream_is_closed_at_any_version(event_store, expected):
    await event_store.append("s1", [paid(1)], NO_STREAM)
    await archive.close(event_store, "s1")
    with pytest.raises(errors.StreamIsClosed) as raised:
        await event_store.append("s1", [paid(2)], expected)
    assert raised.value.stream_id == "s1"
    assert await event_store.stream_version("s1") == 1


async def test_an_append_batch_touching_a_closed_stream_writes_nothing(event_store):
    await event_store.append("s1", [paid(1)], NO_STREAM)
    await archive.close(event_store, "s1")
    with pytest.raises(errors.StreamIsClosed):
        await event_store.append_batch([("s2", [paid(2)], NO_STREAM), ("s1", [paid(3)], 1)])
    assert await event_store.stream_version("s2") == NO_STREAM


async def test_a_retried_append_committed_before_the_close_returns_its_original_result(event_store):
    events = [NewEvent(paid(1), event_id=uuid.uuid4())]
    first = await event_store.append("s1", events, NO_STREAM)
    await archive.close(event_store, "s1")
    assert await event_store.append("s1", events, NO_STREAM) == first


async def test_closing_a_closed_stream_is_refused_with_stream_is_closed(event_store):
    await event_store.append("s1", [paid(1)], NO_STREAM)
    await archive.close(event_store, "s1")
    with pytest.raises(errors.StreamIsClosed):
        await archive.close(event_store, "s1")


async def test_closing_a_stream_without_events_is_stream_not_found(event_store):
    with pytest.raises(errors.StreamNotFound):
        await archive.close(event_store, "none")


# --- archiving -------------------------------------------------------------------------------------------


async def test_archival_moves_the_streams_events_out_unchanged(event_store, publish):
    stream_id = await closed_stream(event_store, publish)
    before = await event_store.load(stream_id)
    await archive_it(event_store, stream_id)
    assert await event_store.load(stream_id) == []
    assert await archive.load_archived(event_store, stream_id) == before
    assert [e.event for e in before] == [paid(1), paid(2), paid(3), StreamClosed("delivered")]


async def test_archival_logs_who_why_and_what_and_appends_stream_archived(event_store, publish):
    stream_id = await closed_stream(event_store, publish)
    positions = [e.global_position for e in await event_store.load(stream_id)]
    entry = await archive_it(event_store, stream_id)
    assert (entry.stream_id, entry.archived_by, entry.reason, entry.events, entry.first_position,
            entry.last_position, entry.last_version) == (
        stream_id, "ops@example", "retention: 7 years", 4, positions[0], positions[-1], 3)
    assert entry.archived_at.tzinfo is not None
    assert await archive.archived(event_store, stream_id) == entry
    (tombstone,) = await event_store.load("archived-s1")
    assert tombstone.event == StreamArchived(stream_id, entry.archive_id, 4, 3, positions[0], positions[-1],
                                             "retention: 7 years")


async def test_a_stream_never_archived_has_no_archive_entry(event_store, publish):
    stream_id = await closed_stream(event_store, publish)
    assert await archive.archived(event_store, stream_id) is None
    assert await archive.load_archived(event_store, stream_id) == []


@pytest.mark.parametrize("expected", [3, NO_STREAM])
async def test_an_archived_stream_keeps_its_version_and_refuses_appends(event_store, publish, expected):
    stream_id = await closed_stream(event_store, publish)
    await archive_it(event_store, stream_id)
    assert await event_store.stream_version(stream_id) == 3
    with pytest.raises(errors.StreamIsClosed):
        await event_store.append(stream_id, [paid(4)], expected)
    with pytest.raises(errors.StreamIsClosed):
        await event_store.append_batch([(stream_id, [paid(4)], NO_STREAM)])
    assert await event_store.load(stream_id) == []


async def test_archival_drops_the_streams_snapshot(event_store, publish):
    stream_id = await closed_stream(event_store, publish)
    await event_store.save_snapshot(stream_id, 2, paid(2))
    await archive_it(event_store, stream_id)
    assert await event_store.load_snapshot(stream_id) is None


async def test_an_open_stream_is_not_archived(event_store, publish):
    await event_store.append("s1", [paid(1)], NO_STREAM)
    await publish()
    with pytest.raises(errors.StreamNotClosed):
        await archive_it(event_store, "s1")
    assert [e.event for e in await event_store.load("s1")] == [paid(1)]


async def test_a_stream_is_archived_once(event_store, publish):
    stream_id = await closed_stream(event_store, publish)
    entry = await archive_it(event_store, stream_id)
    with pytest.raises(errors.AlreadyArchived):
        await archive_it(event_store, stream_id)
    assert await archive.archived(event_store, stream_id) == entry


@pytest.mark.parametrize(("by", "why"), [("", "retention"), ("ops@example", "")])
async def test_an_archival_without_who_or_why_is_refused(event_store, publish, by, why):
    stream_id = await closed_stream(event_store, publish)
    with pytest.raises(errors.InvalidInput, match="who"):
        await archive.archive(event_store, stream_id, archived_by=by, reason=why)
    assert len(await event_store.load(stream_id)) == 4


async def test_the_preview_says_what_an_archival_would_do(event_store, publish):
    await event_store.append("s1", [paid(1)], NO_STREAM)
    await publish()
    assert isinstance((await archive.preview(event_store, "s1")).refusal, errors.StreamNotClosed)
    await archive.close(event_store, "s1")
    await publish()
    ready = await archive.preview(event_store, "s1")
    assert (ready.closed, ready.archived, ready.events, ready.refusal) == (True, False, 2, None)
    await archive_it(event_store, "s1")
    done = await archive.preview(event_store, "s1")
    assert (done.closed, done.archived, done.events) == (True, True, 0)
    assert isinstance(done.refusal, errors.AlreadyArchived)


async def test_read_all_skips_the_archived_events_and_reads_on_from_a_cursor_inside_them(event_store, publish):
    await event_store.append("s0", [paid(0)], NO_STREAM)
    stream_id = await closed_stream(event_store, publish)
    await event_store.append("s2", [paid(2)], NO_STREAM)
    inside = (await event_store.load(stream_id))[1].position
    await archive_it(event_store, stream_id)
    everything = await read_until(event_store, Position.START, lambda read: len(read) >= 3)
    assert [e.stream_id for e in everything] == ["s0", "s2", "archived-s1"]
    after = await read_until(event_store, inside, lambda read: len(read) >= 2)
    assert [(e.stream_id, e.version) for e in after] == [("s2", 0), ("archived-s1", 0)]


# --- with personal fields --------------------------------------------------------------------------------


async def test_archived_personal_fields_read_back_and_are_erased_by_forget(new_store, publish):
    personal_store = new_store(registry=REG, keks=KEKS)
    await personal_store.append("customer-1", [registered("c1")], NO_STREAM)
    await archive.close(personal_store, "customer-1")
    await publish()
    await archive_it(personal_store, "customer-1")
    assert (await archive.load_archived(personal_store, "customer-1"))[0].event == registered("c1")
    await personal_store.forget("c1")
    assert (await archive.load_archived(personal_store, "customer-1"))[0].event == registered("c1", ERASED, None)

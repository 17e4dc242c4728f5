"""Closing and archiving streams: appends refused after the close, the events moved audited in one transaction,
versions, read_all and the read models consistent after, and a rebuild without the archived stream."""

from __future__ import annotations

import asyncpg
import pytest

from eventfleet.examples.orders.events import OrderPaid, OrderPlaced, OrderShipped
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections.base import Projection, handles
from store import NO_STREAM, EventStore, archive, db, errors
from store.codec.closing import StreamArchived, StreamClosed
from store.event_store import RecordedEvent
from tests.integration.test_catchup import below_horizon
from tests.integration.test_rebuild_helpers import all_events, drop_shadows, read_models
from tests.unit.test_projection_fold import fold, paid, placed, shipped
from workers import rebuild
from workers.projector import checkpoints

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)

LIBRARY_EVENTS = (StreamClosed, StreamArchived)


async def publish(pool: db.Pool) -> None:
    """What the relay does once the broker confirmed: the outbox rows go."""
    await pool.execute("DELETE FROM outbox")


async def closed_order(event_store: EventStore, order_id: str = "o1") -> str:
    """order-<order_id> with three events and a StreamClosed (version 3), published; its stream id."""
    stream_id = f"order-{order_id}"
    await event_store.append(stream_id, [placed(order_id, "c1"), paid(order_id, "c1"), shipped(order_id, "c1")],
                             NO_STREAM)
    await archive.close(event_store, stream_id, reason="delivered")
    await publish(event_store.pool)
    return stream_id


async def archive_it(event_store: EventStore, stream_id: str) -> archive.ArchiveEntry:
    return await archive.archive(event_store, stream_id, archived_by="ops@example", reason="retention: 7 years")


class _Orders(Projection):
    """Events per order stream; an archived stream's row goes with it."""

    name = "arch_orders"
    tables = ("arch_orders",)
    ddl = "CREATE TABLE IF NOT EXISTS arch_orders (stream_id text PRIMARY KEY, events integer NOT NULL)"

    @handles(OrderPlaced, OrderPaid, OrderShipped)
    async def count(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO arch_orders VALUES ($1, 1) ON CONFLICT (stream_id) "
                           "DO UPDATE SET events = arch_orders.events + 1", event.stream_id)

    @handles(StreamArchived)
    async def archived(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("DELETE FROM arch_orders WHERE stream_id = $1", event.event.stream_id)


async def orders_rows(pool: db.Pool) -> dict[str, int]:
    return {r["stream_id"]: r["events"] for r in await pool.fetch("SELECT stream_id, events FROM arch_orders")}


# --- closing ---------------------------------------------------------------------------------------------


async def test_closing_appends_stream_closed_at_the_streams_end(event_store):
    await event_store.append("order-o1", [placed("o1", "c1"), paid("o1", "c1")], NO_STREAM)
    assert await archive.close(event_store, "order-o1", reason="delivered") == 2
    last = (await event_store.load("order-o1"))[-1]
    assert (last.version, last.event) == (2, StreamClosed("delivered"))


async def test_an_append_to_a_closed_stream_is_refused_with_stream_is_closed(event_store):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    await archive.close(event_store, "order-o1")
    with pytest.raises(errors.StreamIsClosed) as raised:
        await event_store.append("order-o1", [paid("o1", "c1")], 1)
    assert raised.value.stream_id == "order-o1"
    assert await event_store.stream_version("order-o1") == 1


async def test_an_append_batch_touching_a_closed_stream_writes_nothing(event_store):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    await archive.close(event_store, "order-o1")
    with pytest.raises(errors.StreamIsClosed):
        await event_store.append_batch([("order-o2", [placed("o2", "c2")], NO_STREAM),
                                        ("order-o1", [paid("o1", "c1")], 1)])
    assert await event_store.stream_version("order-o2") == NO_STREAM


async def test_closing_a_closed_stream_is_refused_with_stream_is_closed(event_store):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    await archive.close(event_store, "order-o1")
    with pytest.raises(errors.StreamIsClosed):
        await archive.close(event_store, "order-o1")


async def test_closing_a_stream_without_events_is_stream_not_found(event_store):
    with pytest.raises(errors.StreamNotFound):
        await archive.close(event_store, "order-none")


# --- archiving -------------------------------------------------------------------------------------------


async def test_archival_moves_the_streams_events_to_events_archive_unchanged(pool, event_store):
    stream_id = await closed_order(event_store)
    columns = ("global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, "
               "transaction_id, partition")
    before = await pool.fetch(f"SELECT {columns} FROM events WHERE stream_id = $1 ORDER BY version", stream_id)
    entry = await archive_it(event_store, stream_id)
    after = await pool.fetch(f"SELECT {columns} FROM events_archive WHERE archive_id = $1 ORDER BY version",
                             entry.archive_id)
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", stream_id) == 0
    assert [e.event for e in await archive.load_archived(event_store, stream_id)] == [
        placed("o1", "c1"), paid("o1", "c1"), shipped("o1", "c1"), StreamClosed("delivered")]


async def test_archival_writes_its_audit_row_and_appends_stream_archived(pool, event_store):
    stream_id = await closed_order(event_store)
    positions = [e.global_position for e in await event_store.load(stream_id)]
    entry = await archive_it(event_store, stream_id)
    assert (entry.stream_id, entry.archived_by, entry.reason, entry.events, entry.first_position,
            entry.last_position, entry.last_version) == (
        stream_id, "ops@example", "retention: 7 years", 4, positions[0], positions[-1], 3)
    assert await archive.archived(event_store, stream_id) == entry
    (tombstone,) = await event_store.load("archived-order-o1")
    assert tombstone.event == StreamArchived(stream_id, entry.archive_id, 4, 3, positions[0], positions[-1],
                                             "retention: 7 years")
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1  # the tombstone's, for the fleet


async def test_an_archived_stream_keeps_its_version_and_refuses_appends(event_store):
    stream_id = await closed_order(event_store)
    await archive_it(event_store, stream_id)
    assert await event_store.stream_version(stream_id) == 3
    assert await event_store.load(stream_id) == []
    for expected in (3, NO_STREAM):
        with pytest.raises(errors.StreamIsClosed):
            await event_store.append(stream_id, [paid("o1", "c1")], expected)


async def test_archival_drops_the_streams_snapshot(pool, event_store):
    stream_id = await closed_order(event_store)
    await event_store.save_snapshot(stream_id, 2, placed("o1", "c1"))
    await archive_it(event_store, stream_id)
    assert await event_store.load_snapshot(stream_id) is None


async def test_an_open_stream_is_not_archived(pool, event_store):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    await publish(pool)
    with pytest.raises(errors.StreamNotClosed):
        await archive_it(event_store, "order-o1")
    assert await event_store.stream_version("order-o1") == 0


async def test_a_stream_is_archived_once(event_store):
    stream_id = await closed_order(event_store)
    await archive_it(event_store, stream_id)
    with pytest.raises(errors.AlreadyArchived):
        await archive_it(event_store, stream_id)


async def test_a_stream_whose_events_wait_in_the_outbox_is_not_archived(pool, event_store):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    await archive.close(event_store, "order-o1")
    with pytest.raises(errors.UnpublishedEvents):
        await archive_it(event_store, "order-o1")
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = 'order-o1'") == 2
    assert await pool.fetchval("SELECT count(*) FROM archive_log") == 0


async def test_a_stream_a_projection_holds_halted_at_a_dead_letter_is_not_archived(pool, event_store):
    stream_id = await closed_order(event_store)
    await pool.execute("INSERT INTO checkpoints (projection, stream_id, version, halted_version) "
                       "VALUES ('order_summary', $1, 0, 1)", stream_id)
    with pytest.raises(errors.HaltedStream) as raised:
        await archive_it(event_store, stream_id)
    assert str(raised.value).endswith("halted by order_summary")
    assert (await archive.preview(event_store, stream_id)).halting == ("order_summary",)
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", stream_id) == 4


async def test_a_closed_streams_events_cannot_be_deleted_outside_an_archival(pool, event_store):
    stream_id = await closed_order(event_store)
    with pytest.raises(asyncpg.RestrictViolationError):
        await pool.execute("DELETE FROM events WHERE stream_id = $1", stream_id)


async def test_an_archived_event_cannot_be_changed(pool, event_store):
    stream_id = await closed_order(event_store)
    await archive_it(event_store, stream_id)
    with pytest.raises(asyncpg.RestrictViolationError):
        await pool.execute("UPDATE events_archive SET event_type = 'x' WHERE stream_id = $1", stream_id)
    with pytest.raises(asyncpg.RestrictViolationError):
        await pool.execute("DELETE FROM events_archive WHERE stream_id = $1", stream_id)


# --- read_all, workers and read models after an archival -------------------------------------------------


async def test_read_all_from_a_cursor_inside_the_archived_positions_reads_on(event_store):
    await event_store.append("order-o0", [placed("o0", "c0")], NO_STREAM)
    stream_id = await closed_order(event_store)
    await event_store.append("order-o2", [placed("o2", "c2")], NO_STREAM)
    archived = await event_store.load(stream_id)
    await archive_it(event_store, stream_id)
    await below_horizon(event_store.pool, 3)
    assert [(e.stream_id, e.version) for e in await event_store.read_all(archived[1].position)] == [
        ("order-o2", 0), ("archived-order-o1", 0)]
    assert [e.stream_id for e in await event_store.read_all()] == ["order-o0", "order-o2", "archived-order-o1"]


async def test_a_delivery_of_an_archived_event_arriving_after_the_archival_is_a_ghost_never_applied(
        pool, event_store):
    await pool.execute(_Orders.ddl)
    stream_id = await closed_order(event_store)
    first, _, third, _ = await event_store.load(stream_id)
    await checkpoints.apply_batch(event_store, _Orders(), [first])
    await archive_it(event_store, stream_id)
    # A delivery the worker received before the archival (published, not yet applied) is handled now.
    result = await checkpoints.apply_batch(event_store, _Orders(), [third])
    assert (result.applied, result.ghosts) == ([], [third])
    assert await orders_rows(pool) == {stream_id: 1}
    assert await pool.fetchval("SELECT version FROM checkpoints WHERE projection = $1 AND stream_id = $2",
                               _Orders.name, stream_id) == 0
    letter = await pool.fetchrow("SELECT stream_id, version, error FROM dead_letters WHERE projection = $1",
                                 _Orders.name)
    assert (letter["stream_id"], letter["version"], letter["error"]) == (stream_id, 2, checkpoints.GHOST_ERROR)


async def test_a_rebuild_after_archival_gives_the_read_model_without_the_archived_stream(pool, event_store):
    await event_store.append("order-o0", [placed("o0", "c1"), paid("o0", "c1", amount="5.00")], NO_STREAM)
    stream_id = await closed_order(event_store)
    for projection in (OrderSummary, CustomerStats):
        await checkpoints.apply_batch(event_store, projection(), await all_events(event_store))
    assert "o1" in (await read_models(pool)).order_summary
    await archive_it(event_store, stream_id)
    for projection in (OrderSummary, CustomerStats):
        await rebuild.rebuild(pool, event_store, projection)
    live = [e.event for e in await all_events(event_store) if not isinstance(e.event, LIBRARY_EVENTS)]
    rebuilt = await read_models(pool)
    assert rebuilt == fold(live)
    assert list(rebuilt.order_summary) == ["o0"]
    assert rebuilt.customer_stats["c1"] == fold([placed("o0", "c1"), paid("o0", "c1", amount="5.00")]
                                                ).customer_stats["c1"]


async def test_a_projection_handling_stream_archived_equals_its_rebuild_after_archival(pool, event_store):
    await pool.execute(_Orders.ddl)
    await event_store.append("order-o0", [placed("o0", "c1")], NO_STREAM)
    stream_id = await closed_order(event_store)
    await checkpoints.apply_batch(event_store, _Orders(), await all_events(event_store))
    await archive_it(event_store, stream_id)
    tombstone = await event_store.load("archived-order-o1")
    await checkpoints.apply_batch(event_store, _Orders(), tombstone)
    live = await orders_rows(pool)
    await rebuild.rebuild(pool, event_store, _Orders)
    assert live == await orders_rows(pool) == {"order-o0": 1}


# --- the command line ------------------------------------------------------------------------------------


async def test_close_stream_and_archive_yes_by_the_command_line(pool, event_store, schema, run_cli):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    ran = await run_cli("close-stream", "order-o1", "--reason", "delivered", schema=schema, prefix="t_unused")
    assert (ran.code, ran.out) == (0, "stream order-o1: closed at version 1\n")
    await publish(pool)
    ran = await run_cli("archive", "order-o1", "--reason", "retention", "--by", "ops", "--yes", schema=schema,
                        prefix="t_unused")
    entry = await archive.archived(event_store, "order-o1")
    assert entry is not None
    assert (ran.code, ran.out) == (0, (f"stream order-o1: archived 2 event(s) (versions 0-1, positions "
                                      f"{entry.first_position}-{entry.last_position}) as archive "
                                      f"{entry.archive_id}, by ops\n"))
    assert (entry.archived_by, entry.reason) == ("ops", "retention")


async def test_archive_without_yes_says_what_it_would_do_and_changes_nothing(pool, event_store, schema, run_cli):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    ran = await run_cli("archive", "order-o1", "--reason", "retention", schema=schema, prefix="t_unused")
    assert (ran.code, ran.err) == (2, ("eventfleet archive: refusing without --yes; stream order-o1: refused: "
                                      "stream 'order-o1' cannot be archived: only a closed stream is archived: "
                                      "close it first (eventfleet close-stream)\n"))
    await archive.close(event_store, "order-o1")
    await publish(pool)
    ran = await run_cli("archive", "order-o1", "--reason", "retention", schema=schema, prefix="t_unused")
    assert (ran.code, ran.err) == (2, ("eventfleet archive: refusing without --yes; stream order-o1: would move 2 "
                                      "event(s) to events_archive and append StreamArchived to "
                                      "archived-order-o1\n"))
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = 'order-o1'") == 2


async def test_an_append_to_a_closed_stream_fails_the_command_line_with_its_reason(event_store, schema, run_cli):
    await event_store.append("order-o1", [placed("o1", "c1")], NO_STREAM)
    await archive.close(event_store, "order-o1")
    ran = await run_cli("close-stream", "order-o1", schema=schema, prefix="t_unused")
    assert (ran.code, ran.err) == (1, ("eventfleet close-stream: stream 'order-o1' is closed: it takes no more "
                                      "events\n"))

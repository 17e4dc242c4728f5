"""The store side reads only the types a read model handles (issue 25 item 4): a catch-up, a rebuild, a backfill,
verify's replay and the lag of a one-type read model read its events along the store's index of names, and
give exactly what a read of every event gives."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Any, ClassVar, LiteralString

import pytest

from eventfleet.examples.orders.events import OrderShipped
from projections.base import Projection, handles
from store import EventStore, Position, db, migrate
from store.event_store import RecordedEvent
from tests.integration import test_catchup as catchup
from tests.integration.test_catchup import busiest, consumer_of, of_partition, visible
from tests.integration.test_rebuild_helpers import all_events, drop_shadows, write_orders
from workers import rebuild
from workers.admin import verify
from workers.projector import checkpoints, lag
from workers.rebuild import backfill, reader

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)

# The catch-up tests' fixtures: a broker connection, the partition topology, the consumer's settings.
connection, declare, settings = catchup.connection, catchup.declare, catchup.settings


class Shipments(Projection):
    """A read model of one type: the carrier of every shipped order."""

    name = "shipments"
    tables = ("shipments",)
    ddl: ClassVar[LiteralString] = ("CREATE TABLE IF NOT EXISTS shipments"
                                    " (order_id text PRIMARY KEY, carrier text NOT NULL, times integer NOT NULL)")

    @handles(OrderShipped)
    async def shipped(self, conn: db.Conn, event: RecordedEvent) -> None:
        # Counted: an event applied twice (or missed) shows.
        await conn.execute("INSERT INTO shipments AS s VALUES ($1, $2, 1) ON CONFLICT (order_id)"
                           " DO UPDATE SET carrier = EXCLUDED.carrier, times = s.times + 1",
                           event.event.order_id, event.event.carrier)


class EveryEventShipments(Shipments):
    """The same read model over every event (the reference: a full replay)."""

    all_events = True


async def shipped(event_store: EventStore) -> list[RecordedEvent]:
    return [e for e in await all_events(event_store) if isinstance(e.event, OrderShipped)]


async def shipment_rows(pool: db.Pool) -> dict[str, tuple[str, int]]:
    rows = await pool.fetch("SELECT order_id, carrier, times FROM shipments")
    return {r["order_id"]: (r["carrier"], r["times"]) for r in rows}


def expected_rows(events: list[RecordedEvent]) -> dict[str, tuple[str, int]]:
    """The fold of the shipped events (in stream and version order)."""
    rows: dict[str, tuple[str, int]] = {}
    for e in sorted(events, key=lambda e: (e.stream_id, e.version)):
        rows[e.event.order_id] = (e.event.carrier, rows.get(e.event.order_id, ("", 0))[1] + 1)
    return rows


@pytest.fixture
def read_types(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The types of the events the rebuild's readers return (a counting wrapper around workers.rebuild.reader)."""
    seen: list[str] = []

    def counting(make: Callable[..., reader.Read]) -> Callable[..., reader.Read]:
        def build(store: EventStore, event_names: Collection[str] | None = None) -> reader.Read:
            read = make(store, event_names)

            async def wrapped(after: Position, limit: int, max_bytes: int) -> Any:
                found = await read(after, limit, max_bytes)
                seen.extend(e.event_type for e in found)
                return found

            return wrapped

        return build

    monkeypatch.setattr(reader, "all_reader", counting(reader.all_reader))
    monkeypatch.setattr(reader, "settled_reader", counting(reader.settled_reader))
    return seen


async def test_a_rebuild_of_a_one_type_read_model_reads_only_its_events_and_equals_a_full_replay(
        pool, event_store, read_types):
    total = await write_orders(event_store, 80, random.Random(4))
    mine = await shipped(event_store)
    assert 0 < len(mine) < total

    result = await rebuild.rebuild(pool, event_store, Shipments, batch_size=7)

    assert result.events == len(mine)
    assert read_types == ["OrderShipped.v1"] * len(mine)
    assert await shipment_rows(pool) == expected_rows(mine)
    read_types.clear()
    full = await rebuild.rebuild(pool, event_store, EveryEventShipments, batch_size=7)
    assert (full.events, len(read_types)) == (total, total)
    assert await shipment_rows(pool) == expected_rows(mine)


async def test_a_rebuild_fills_a_one_type_read_models_version_gaps_with_its_own_types_only(pool, event_store):
    # A stream's shipped event read before an earlier version of its own type (a transaction with an older id
    # appended it later): the gap between the shadow's checkpoint and the event is loaded, of its type only.
    await write_orders(event_store, 30, random.Random(5))
    mine = await shipped(event_store)
    shadow = rebuild.Rebuild(pool, event_store, Shipments)
    async with pool.acquire() as conn:
        await shadow._create_shadow(conn)
        async with conn.transaction():
            await shadow.applier.apply(conn, [mine[0]])
        versions = await conn.fetch("SELECT stream_id, version FROM rebuild_checkpoints")
        rows = await shadow.applier.load_ranges(conn, [mine[0].stream_id], [0], [mine[0].version])
        await conn.execute("RESET search_path")
    assert [(r["stream_id"], r["version"]) for r in versions] == [(mine[0].stream_id, mine[0].version)]
    assert [(r["stream_id"], r["version"]) for r in rows] == [(mine[0].stream_id, mine[0].version)]


async def test_a_backfill_of_a_new_one_type_read_model_reads_only_its_events(pool, event_store, read_types):
    await write_orders(event_store, 40, random.Random(6))
    mine = await shipped(event_store)

    result = await backfill.backfill_if_new(pool, event_store, Shipments)

    assert result is not None
    assert result.events == len(mine)
    assert set(read_types) == {"OrderShipped.v1"}
    assert await shipment_rows(pool) == expected_rows(mine)


async def test_verify_of_a_one_type_read_model_replays_only_its_events(pool, event_store, read_types):
    await write_orders(event_store, 40, random.Random(7))
    mine = await shipped(event_store)
    await pool.execute(Shipments.ddl)
    await checkpoints.apply_batch(event_store, Shipments(), mine)

    found = await verify.verify(pool, event_store, Shipments)

    assert (found.ok, found.events) == (True, len(mine))
    assert read_types == ["OrderShipped.v1"] * len(mine)


async def test_the_lag_of_a_one_type_read_model_counts_only_its_events(pool, event_store):
    total = await write_orders(event_store, 40, random.Random(8))
    mine = await shipped(event_store)
    await pool.execute(Shipments.ddl)

    behind = await lag.measure(pool, Shipments.name, event_names=Shipments.handled_names())

    assert behind.lag_events == len(mine)
    assert (await lag.measure(pool, Shipments.name, event_names=None)).lag_events == total


async def test_the_watermark_of_a_one_type_read_model_passes_the_other_types(pool, event_store):
    await write_orders(event_store, 40, random.Random(9))
    mine = await shipped(event_store)
    await pool.execute(Shipments.ddl)
    await checkpoints.apply_batch(event_store, Shipments(), mine)
    await visible(event_store, await all_events(event_store))
    last = max(e.position for e in mine)

    caught_up = await lag.measure(pool, Shipments.name, event_names=Shipments.handled_names())

    assert (caught_up.lag_events, caught_up.watermark) == (0, last)


async def test_a_catch_up_of_a_one_type_read_model_reads_only_its_events(pool, event_store, connection, declare,
                                                                        settings):
    await declare([Shipments.name])
    await pool.execute(Shipments.ddl)
    await write_orders(event_store, 80, random.Random(10))
    events = await visible(event_store, await all_events(event_store))
    p = busiest(events)
    mine = [e for e in of_partition(events, p) if isinstance(e.event, OrderShipped)]
    c = await consumer_of(event_store, connection, settings, Shipments(), p)
    read_partition, types = event_store.read_partition, list[str]()

    async def counting(*args: Any, **kwargs: Any) -> Any:
        found = await read_partition(*args, **kwargs)
        types.extend(e.event_type for e in found)
        return found

    event_store.read_partition = counting

    assert await c.catchup.run(Position.START) == len(mine)

    assert types == ["OrderShipped.v1"] * len(mine)
    assert await shipment_rows(pool) == expected_rows(mine)


async def test_migrate_builds_the_index_of_names_on_a_store_that_holds_events(pool, event_store, schema):
    # A store migrated before the index existed (dropped here), with events; an interrupted concurrent build
    # leaves an invalid index behind: simulated by marking it so.
    await write_orders(event_store, 20, random.Random(11))
    await pool.execute("DROP INDEX events_name_idx")
    async with pool.acquire() as conn:
        await migrate.migrate(conn, schema)
        assert await index_valid(conn, schema) is True
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'events_name_idx'::regclass")
        assert await index_valid(conn, schema) is False
        await migrate.migrate(conn, schema)
        assert await index_valid(conn, schema) is True


async def index_valid(conn: db.Conn, schema: str) -> bool | None:
    valid: bool | None = await conn.fetchval(
        "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid"
        " JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'events_name_idx'",
        schema)
    return valid

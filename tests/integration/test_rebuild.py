"""Rebuild and backfill: the shadow equals the fold, the swap loses and doubles nothing, a killed run resumes."""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pytest
import tenacity

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections.base import Projection, handles
from store import NO_STREAM, EventStore, db
from store.event_store import RecordedEvent
from tests.integration.test_rebuild_helpers import (
    all_events,
    checkpoints_of,
    drop_shadows,
    expected,
    read_models,
    stream_versions,
    write_orders,
)
from tests.unit.test_projection_fold import paid, placed, shipped
from workers import errors, rebuild
from workers.projector import checkpoints, parking

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)


async def status_row(pool: db.Pool, projection: str) -> Any:
    return await pool.fetchrow("SELECT state, applied FROM projection_status WHERE projection = $1", projection)


async def schema_exists(pool: db.Pool, name: str) -> bool:
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", name))


async def test_rebuild_replaces_a_wrong_read_model_with_the_fold(pool, event_store, schema):
    total = await write_orders(event_store, 80, random.Random(1))
    # The live tables are wrong: a row no event made and a counter off by far.
    await pool.execute("INSERT INTO order_summary VALUES ('ghost', 'c', 'paid', 1, 1, now(), now())")
    await pool.execute("INSERT INTO customer_stats VALUES ('c0', 99, 99, 99)")
    shown: list[tuple[int, int]] = []
    for projection in (OrderSummary, CustomerStats):
        handled = len([e for e in await all_events(event_store) if projection().handles_type(e.event_type)])
        result = await rebuild.rebuild(pool, event_store, projection, batch_size=40,
                                       progress=lambda done, of, _: shown.append((done, of)))
        assert (result.events, result.resumed, result.caught_up_streams) == (handled, False, 0)
        assert not await schema_exists(pool, rebuild.shadow_schema(schema, projection.name))
        versions = await stream_versions(event_store, projection)  # of the events it handles (issue 25)
        assert tuple(await status_row(pool, projection.name)) == ("live", sum(v + 1 for v in versions.values()))
        assert await checkpoints_of(pool, projection.name) == versions
        assert shown[-1] == (handled, handled)
    assert handled < total  # customer_stats has no handler for OrderShipped
    assert await read_models(pool) == await expected(event_store)
    # Filled unlogged, swapped in logged: a crash must not empty a live read model.
    persistence = await pool.fetch("SELECT relname, relpersistence::text FROM pg_class WHERE relnamespace = $1::regnamespace"
                                   " AND relname IN ('order_summary', 'customer_stats')", schema)
    assert {r["relname"]: r["relpersistence"] for r in persistence} == {"order_summary": "p", "customer_stats": "p"}


class _LiveWorkersRaceAhead(rebuild.Rebuild):
    """Before the swap, writers append and a live worker applies what the rebuild has not read."""

    async def _swap(self, conn: db.Conn) -> int:
        store = self.store
        late: list[tuple[str, list[Any]]] = [
            ("order-o1", [shipped("o1", "late")]),
            ("order-late", [placed("late", "c-late"), paid("late", "c-late")]),
        ]
        for stream_id, payloads in late:
            await store.append(stream_id, payloads, await store.stream_version(stream_id))
        events = [e for sid, _ in late for e in await store.load(sid)]
        await checkpoints.apply_batch(store, self.projection(), events)
        await store.append("order-o2", [paid("o2", "c-late")], await store.stream_version("order-o2"))
        return await super()._swap(conn)


async def test_swap_applies_what_live_workers_did_meanwhile_and_they_skip_what_the_shadow_did(pool, event_store):
    await event_store.append("order-o1", [placed("o1", "c1"), paid("o1", "c1")], NO_STREAM)
    await event_store.append("order-o2", [placed("o2", "c2")], NO_STREAM)
    # The live worker had applied order-o1 up to version 0 only.
    await checkpoints.apply_batch(event_store, CustomerStats(), (await event_store.load("order-o1"))[:1])

    result = await _LiveWorkersRaceAhead(pool, event_store, CustomerStats).run()
    # order-late; order-o1's late OrderShipped is no event of customer_stats (issue 25: it reads its types only)
    assert result.caught_up_streams == 1

    # After the swap the live worker sees every event again (redeliveries and the unread tail):
    # what the shadow has is a duplicate, order-o2's payment is new.
    replay = await checkpoints.apply_batch(event_store, CustomerStats(), await all_events(event_store))
    assert [(e.stream_id, e.version) for e in replay.applied] == [("order-o2", 1)]
    assert (await read_models(pool)).customer_stats == (await expected(event_store)).customer_stats
    # Each checkpoint at its stream's last event of customer_stats's types (order-o1's OrderShipped is not one).
    assert await checkpoints_of(pool, "customer_stats") == await stream_versions(event_store, CustomerStats)


class _Killed(Exception):
    pass


async def test_a_rebuild_reads_the_store_in_reads_bounded_in_bytes_to_the_tail(pool, event_store, schema):
    total = await write_orders(event_store, 40, random.Random(3))
    batches: list[int] = []

    def count(done: int, of: int, seconds: float) -> None:
        batches.append(done - sum(batches))

    result = await rebuild.rebuild(pool, event_store, OrderSummary, batch_size=1000, batch_bytes=2048, progress=count)

    assert result.events == total
    assert len(batches) > 1  # read on past reads cut by bytes, to the tail
    assert max(batches) < total  # cut by bytes, not by the 1,000 rows
    assert (await read_models(pool)).order_summary == (await expected(event_store)).order_summary


async def test_a_killed_rebuild_resumes_where_it_stopped(pool, event_store, schema):
    total = await write_orders(event_store, 60, random.Random(2))

    def die_after_two_batches(done: int, of: int, seconds: float) -> None:
        if done >= 50:
            raise _Killed

    with pytest.raises(_Killed):
        await rebuild.rebuild(pool, event_store, OrderSummary, batch_size=25, progress=die_after_two_batches)
    shadow = rebuild.shadow_schema(schema, "order_summary")
    assert await schema_exists(pool, shadow)
    assert await pool.fetchval("SELECT relpersistence::text FROM pg_class WHERE relname = 'order_summary'"
                               " AND relnamespace = $1::regnamespace", shadow) == "u"
    assert tuple(await status_row(pool, "order_summary")) == ("live", 0)  # the old table still serves
    assert await pool.fetchval("SELECT count(*) FROM order_summary") == 0

    result = await rebuild.rebuild(pool, event_store, OrderSummary, batch_size=25)
    assert result.resumed
    assert result.events == total - 50
    assert (await read_models(pool)).order_summary == (await expected(event_store)).order_summary


async def test_a_second_rebuild_of_the_same_projection_is_refused_while_one_runs(pool, event_store, schema):
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))",
                           f"eventfleet.rebuild.{schema}.order_summary")
        with pytest.raises(errors.RebuildRunning):
            await rebuild.rebuild(pool, event_store, OrderSummary)


class _Probe(Projection):
    """A projection whose handler fails on order-bad's version 1 and reads before it writes (no batching)."""

    name = "rb_probe"
    tables = ("rb_probe",)
    ddl = "CREATE TABLE IF NOT EXISTS rb_probe (order_id text PRIMARY KEY, events integer NOT NULL)"
    seen: ClassVar[list[str]] = []

    @handles(OrderPlaced, OrderPaid)
    async def count(self, conn: db.Conn, event: RecordedEvent) -> None:
        if event.event.order_id == "bad" and event.version == 1:
            raise ValueError("cannot handle this payment")
        current = await conn.fetchval("SELECT events FROM rb_probe WHERE order_id = $1", event.event.order_id)
        await conn.execute("INSERT INTO rb_probe VALUES ($1, 1) ON CONFLICT (order_id) DO UPDATE SET events = $2",
                           event.event.order_id, (current or 0) + 1)


class _SkippingProbe(_Probe):
    policy = "skip"


@pytest.mark.parametrize(("probe", "bad_checkpoint", "halted", "bad_rows"),
                         [(_Probe, (0, 1), "parked", 1), (_SkippingProbe, (2, None), "skipped", 2)])
async def test_a_failing_handler_follows_the_projection_policy(pool, event_store, probe, bad_checkpoint,
                                                              halted, bad_rows):
    await event_store.append("order-bad", [placed("bad", "c"), paid("bad", "c"), paid("bad", "c")], NO_STREAM)
    await event_store.append("order-ok", [placed("ok", "c"), paid("ok", "c")], NO_STREAM)
    result = await rebuild.rebuild(pool, event_store, probe)
    assert (result.skipped, result.halted_streams) == ((0, ("order-bad",)) if halted == "parked" else (1, ()))
    rows = dict(await pool.fetch("SELECT order_id, events FROM rb_probe"))
    assert rows == {"ok": 2, "bad": bad_rows}
    checkpoint = await pool.fetchrow("SELECT version, halted_version FROM checkpoints "
                                     "WHERE projection = 'rb_probe' AND stream_id = 'order-bad'")
    assert tuple(checkpoint) == bad_checkpoint
    letters = await pool.fetch("SELECT version, status FROM dead_letters WHERE projection = 'rb_probe'")
    assert [tuple(r) for r in letters] == [(1, halted)]


class _Sequence(Projection):
    """Appends each event's version to its stream's row, with two statements per event: order-sensitive."""

    name = "rb_sequence"
    tables = ("rb_sequence",)
    ddl = "CREATE TABLE IF NOT EXISTS rb_sequence (stream_id text PRIMARY KEY, versions text NOT NULL)"

    @handles(OrderPlaced, OrderPaid, OrderShipped, OrderCancelled)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO rb_sequence VALUES ($1, '') ON CONFLICT DO NOTHING", event.stream_id)
        await conn.execute("UPDATE rb_sequence SET versions = versions || $2 || ',' WHERE stream_id = $1",
                           event.stream_id, str(event.version))


async def test_deferred_batching_keeps_each_stream_and_each_event_in_order(pool, event_store):
    await write_orders(event_store, 40, random.Random(4))
    run = rebuild.Rebuild(pool, event_store, _Sequence, batch_size=30)
    await run.run()
    assert run.applier.batchable  # it never had to fall back to one event at a time
    rows = dict(await pool.fetch("SELECT stream_id, versions FROM rb_sequence"))
    assert rows == {sid: "".join(f"{v}," for v in range(last + 1))
                    for sid, last in (await stream_versions(event_store)).items()}


async def test_readers_of_the_old_table_keep_their_grants_after_the_swap(pool, event_store, schema):
    role = f"{schema}_reader"
    await pool.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        await pool.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await pool.execute(f'GRANT SELECT ON order_summary TO "{role}"')
        await write_orders(event_store, 5, random.Random(8))
        await rebuild.rebuild(pool, event_store, OrderSummary)
        privileges = [await pool.fetchval("SELECT has_table_privilege($1, 'order_summary', $2)", role, p)
                      for p in ("SELECT", "INSERT")]
        assert privileges == [True, False]
    finally:
        await pool.execute(f'DROP OWNED BY "{role}"')
        await pool.execute(f'DROP ROLE "{role}"')


class _Fixable(Projection):
    """Records each event; while ``broken``, fails on order-bad's version 1 (a bug fixed before the rebuild)."""

    name = "rb_fixable"
    tables = ("rb_fixable",)
    ddl = "CREATE TABLE IF NOT EXISTS rb_fixable (stream_id text, version bigint, PRIMARY KEY (stream_id, version))"
    broken: ClassVar[bool] = True

    @handles(OrderPlaced, OrderPaid)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        if self.broken and event.stream_id == "order-bad" and event.version == 1:
            raise ValueError("cannot handle this payment")
        await conn.execute("INSERT INTO rb_fixable VALUES ($1, $2)", event.stream_id, event.version)


async def halt_order_bad_live(pool: db.Pool, event_store: EventStore) -> None:
    """Live workers park order-bad's version 1 and halt the stream there (order-ok flows)."""
    await pool.execute(_Fixable.ddl)
    await event_store.append("order-bad", [placed("bad", "c"), paid("bad", "c"), paid("bad", "c")], NO_STREAM)
    await event_store.append("order-ok", [placed("ok", "c"), paid("ok", "c")], NO_STREAM)
    result = await parking.apply_or_park(event_store, _Fixable(), await all_events(event_store),
                                              wait=tenacity.wait_none())
    assert [(p.event.stream_id, p.event.version) for p in result.parked] == [("order-bad", 1)]


async def bad_checkpoint_and_letters(pool: db.Pool) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    checkpoint = await pool.fetchrow("SELECT version, halted_version FROM checkpoints "
                                     "WHERE projection = 'rb_fixable' AND stream_id = 'order-bad'")
    letters = await pool.fetch("SELECT version, status, resolved_at IS NOT NULL FROM dead_letters "
                               "WHERE projection = 'rb_fixable' ORDER BY id")
    assert checkpoint is not None
    return tuple(checkpoint), [tuple(r) for r in letters]


async def test_a_rebuild_that_applies_a_parked_event_resolves_its_dead_letter(pool, event_store, monkeypatch):
    await halt_order_bad_live(pool, event_store)
    assert await bad_checkpoint_and_letters(pool) == ((0, 1), [(1, "parked", False)])
    monkeypatch.setattr(_Fixable, "broken", False)  # the handler was fixed and deployed

    result = await rebuild.rebuild(pool, event_store, _Fixable)

    assert await bad_checkpoint_and_letters(pool) == ((2, None), [(1, "retried", True)])
    assert (result.halted_streams, result.resolved_dead_letters) == ((), 1)
    assert await parking.list_parked(pool, "rb_fixable") == []
    rows = await pool.fetch("SELECT stream_id, version FROM rb_fixable ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [("order-bad", 0), ("order-bad", 1), ("order-bad", 2),
                                        ("order-ok", 0), ("order-ok", 1)]


async def test_a_rebuild_whose_handler_still_fails_leaves_the_dead_letter_parked(pool, event_store):
    await halt_order_bad_live(pool, event_store)

    result = await rebuild.rebuild(pool, event_store, _Fixable)

    assert await bad_checkpoint_and_letters(pool) == ((0, 1), [(1, "parked", False)])
    assert (result.halted_streams, result.resolved_dead_letters) == (("order-bad",), 0)


async def test_a_rebuild_that_skips_a_parked_event_marks_its_dead_letter_skipped(pool, event_store, monkeypatch):
    await halt_order_bad_live(pool, event_store)
    monkeypatch.setattr(_Fixable, "policy", "skip")  # still failing, but the projection now skips poison

    result = await rebuild.rebuild(pool, event_store, _Fixable)

    assert await bad_checkpoint_and_letters(pool) == ((2, None), [(1, "skipped", True), (1, "skipped", False)])
    assert (result.skipped, result.resolved_dead_letters) == (1, 1)


async def test_a_stored_event_that_cannot_be_decoded_halts_its_stream_not_the_rebuild(pool, event_store):
    await pool.execute(_Fixable.ddl)
    await event_store.append("order-ok", [placed("ok", "c"), paid("ok", "c")], NO_STREAM)
    # Written around the store's API: a real payload, but metadata that is not msgpack.
    await pool.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                       "SELECT gen_random_uuid(), 'order-corrupt', 0, event_type, data, '\\xc1'::bytea "
                       "FROM events WHERE stream_id = 'order-ok' AND version = 0")
    await event_store.append("order-corrupt", [paid("corrupt", "c")], 0)

    result = await rebuild.rebuild(pool, event_store, _Fixable)

    assert result.halted_streams == ("order-corrupt",)
    rows = await pool.fetch("SELECT stream_id, version FROM rb_fixable ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [("order-ok", 0), ("order-ok", 1)]
    checkpoint = await pool.fetchrow("SELECT version, halted_version FROM checkpoints "
                                     "WHERE projection = 'rb_fixable' AND stream_id = 'order-corrupt'")
    assert tuple(checkpoint) == (-1, 0)
    letters = await pool.fetch("SELECT version, status, error FROM dead_letters WHERE projection = 'rb_fixable'")
    assert [(r["version"], r["status"]) for r in letters] == [(0, "parked")]
    assert letters[0]["error"].startswith("CorruptEvent: corrupt msgpack")

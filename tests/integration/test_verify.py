"""``eventfleet verify PROJECTION``: a read model against a replay of the store, the rows that differ by key."""

from __future__ import annotations

import json

import asyncpg

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import NO_STREAM
from tests.conftest import DATABASE_URL, new_schema
from tests.unit.test_projection_fold import cancelled, paid, placed, shipped
from workers import admin
from workers.admin import verify as engine
from workers.cli import verify as command
from workers.projector import checkpoints
from workers.rebuild import shadow_schema


async def _write_and_apply(event_store, *, leave_out: int = 0) -> None:
    """Four orders of three customers; both projections apply every event but the last ``leave_out``."""
    await event_store.append("order-1", [placed("1", "c1", total="10.00"), paid("1", "c1", "10.00")], NO_STREAM)
    await event_store.append("order-2", [placed("2", "c2"), cancelled("2", "c2")], NO_STREAM)
    await event_store.append("order-3", [placed("3", "c3"), paid("3", "c3", "7.50"), shipped("3", "c3")], NO_STREAM)
    await event_store.append("order-4", [placed("4", "c2")], NO_STREAM)
    await event_store.append("order-5", [placed("5", "c4"), paid("5", "c4", "1.00")], NO_STREAM)
    events = [e for s in ("order-1", "order-2", "order-3", "order-4", "order-5") for e in await event_store.load(s)]
    for projection in (CustomerStats(), OrderSummary()):
        await checkpoints.apply_batch(event_store, projection, events[:len(events) - leave_out])


async def test_a_read_model_equal_to_the_replay_matches_and_exits_0(event_store, pool, schema, prefix, run_cli):
    await _write_and_apply(event_store)
    ran = await run_cli("verify", "customer_stats", schema=schema, prefix=prefix)
    assert ran.code == 0, ran.err
    # customer_stats handles 9 of the 10 (no OrderShipped): the replay reads only those.
    assert ran.out.splitlines() == ["customer_stats: read model against a replay of 9 events",
                                    "  customer_stats         4 rows  match", "result: OK"]
    ran = await run_cli("verify", "order_summary", "--json", schema=schema, prefix=prefix)
    assert ran.code == 0, ran.err
    assert json.loads(ran.out) == {"projection": "order_summary", "events": 10, "ok": True, "tables": [
        {"table": "order_summary", "key": ["order_id"], "rows": 5, "replayed_rows": 5, "only_in_read_model": 0,
         "only_in_replay": 0, "read_model_keys": [], "replay_keys": [], "truncated": False}], "forgotten": []}
    # The scratch schema is gone; the live state untouched.
    scratch = shadow_schema(schema, "order_summary", kind="vf")
    assert await pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", scratch) == 0
    assert await pool.fetchval("SELECT count(*) FROM checkpoints") == 10


async def test_the_rows_that_differ_are_named_by_key_on_each_side_and_exit_1(event_store, pool, schema, prefix,
                                                                             run_cli):
    await _write_and_apply(event_store, leave_out=1)  # c4's payment never applied
    await pool.execute("UPDATE customer_stats SET total_spent = total_spent + 1 WHERE customer_id = 'c1'")
    await pool.execute("INSERT INTO customer_stats (customer_id, orders_placed) VALUES ('ghost', 1)")
    await pool.execute("DELETE FROM customer_stats WHERE customer_id = 'c3'")
    ran = await run_cli("verify", "customer_stats", "--json", schema=schema, prefix=prefix)
    assert ran.code == 1, ran.err
    report = json.loads(ran.out)
    assert report["ok"] is False
    assert report["events"] == 9  # of its types: no OrderShipped
    [table] = report["tables"]
    assert table | {"read_model_keys": None, "replay_keys": None} == {
        "table": "customer_stats", "key": ["customer_id"], "rows": 4, "replayed_rows": 4, "only_in_read_model": 3,
        "only_in_replay": 3, "read_model_keys": None, "replay_keys": None, "truncated": False}
    assert table["read_model_keys"] == [["c1"], ["c4"], ["ghost"]]  # changed, behind, only here
    assert table["replay_keys"] == [["c1"], ["c3"], ["c4"]]  # changed, deleted, behind

    ran = await run_cli("verify", "customer_stats", "--limit", "1", schema=schema, prefix=prefix)
    assert ran.code == 1
    assert "4 rows  4 in the replay: 6 rows differ" in ran.out
    assert "3 only in the read model (customer_id): c1 ... and 2 more" in ran.out
    assert "3 only in the replay (customer_id): c1 ... and 2 more" in ran.out
    assert ran.out.strip().endswith("result: MISMATCH")
    # The other projection is exact but for the event left out: order-5 is still "placed" in its read model.
    ran = await run_cli("verify", "order_summary", "--json", schema=schema, prefix=prefix)
    assert ran.code == 1
    [table] = json.loads(ran.out)["tables"]
    assert (table["read_model_keys"], table["replay_keys"]) == ([["5"]], [["5"]])


async def test_an_unknown_projection_or_an_unmigrated_schema_is_a_one_line_error(schema, prefix, run_cli):
    ran = await run_cli("verify", "no_such_projection", schema=schema, prefix=prefix)
    assert ran.code == 1
    assert ran.err.startswith("eventfleet verify: no projection named 'no_such_projection'")
    ran = await run_cli("verify", "customer_stats", schema="t_not_migrated_here", prefix=prefix)
    assert ran.code == 1
    assert "schema 't_not_migrated_here' is not migrated" in ran.err or "does not exist" in ran.err


def test_composite_keys_are_shown_in_parentheses():
    table = engine.TableDiff("t", ("a", "b"), 2, 2, 1, 1, (("x", 1),), (("x", None),))
    text = command.render(engine.Verification("p", 3, (table,)))
    assert "1 only in the read model (a, b): (x, 1)" in text
    assert "1 only in the replay (a, b): (x, NULL)" in text


async def drop_schema(name: str) -> None:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def test_a_deployment_needing_more_than_half_a_default_brokers_file_handles_is_warned_about_on_stderr(
        prefix, run_cli, cleanup):
    name = new_schema()
    cleanup(lambda: drop_schema(name))
    await admin.run_migrate(DATABASE_URL, name, partitions=80)
    ran = await run_cli("verify", "customer_stats", schema=name, prefix=prefix)
    assert ran.code == 0
    assert ran.err == (
        "eventfleet verify: warning: this deployment declares 162 quorum queues (2 projections x (80 partitions + 1 "
        "DLQ)), ~486 file handles of the broker; a node with the Debian default of 1,024 descriptors has ~927: this "
        "deployment alone needs more than half of the file handles of a RabbitMQ node with the default limit; past "
        "927 the node stops answering: raise its limit (docs/reference.md, \"RabbitMQ versions and the broker's "
        "limits\")\n")

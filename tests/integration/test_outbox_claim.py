"""The relay's claim: its cost follows the rows it claims, never the size of the store."""

from __future__ import annotations

import json
from typing import Any

from store import NO_STREAM, EventStore, db, outbox
from tests.unit.test_projection_fold import cancelled, paid
from workers.relay.session import SESSION_SETTINGS


def scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    found = [plan]
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


async def test_the_claim_reads_events_by_key_even_when_the_outbox_statistics_are_stale(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [paid(str(i), "c")], NO_STREAM) for i in range(3000)])
    await pool.execute("ANALYZE outbox")
    await pool.execute("ANALYZE events")
    # The relay published most of it; autovacuum and ANALYZE have not come by since.
    await pool.execute("DELETE FROM outbox WHERE global_position > (SELECT min(global_position) + 9 FROM outbox)")

    async with pool.acquire() as conn, conn.transaction():
        (row,) = await conn.fetch("EXPLAIN (FORMAT JSON) " + outbox.SQL["claim"], 1000, outbox.UNBOUNDED)
        claimed = await outbox.claim(conn, 1000)

    nodes = scans(json.loads(row[0])[0]["Plan"])
    events_scans = [n for n in nodes if n.get("Relation Name") == "events"]
    assert events_scans, "the claim reads no events"
    assert all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in events_scans)
    assert all("global_position" in n.get("Index Cond", "") for n in events_scans)  # a lookup, not a full walk
    assert len(claimed) == 10
    assert [r["global_position"] for r in claimed] == sorted(r["global_position"] for r in claimed)


async def test_the_relays_generic_plan_of_its_claim_made_on_an_empty_outbox_still_finds_rows_by_key_and_ctid(
        pool: db.Pool, event_store: EventStore) -> None:
    # Postgres keeps a generic plan of a prepared statement after a few runs. The relay's is made while the outbox
    # holds a few rows; under its session settings it must not scan the outbox whole once a backlog (a broker
    # outage) has grown it.
    await event_store.append_batch([(f"s{i}", [paid(str(i), "c")], NO_STREAM) for i in range(3)])
    async with pool.acquire() as conn:
        for name, value in SESSION_SETTINGS.items():
            await conn.execute("SELECT set_config($1, $2, false)", name, value)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE relay_claim(integer, bigint) AS " + outbox.SQL["claim"].rstrip().rstrip(";"))
        async with conn.transaction():
            await conn.execute("EXPLAIN EXECUTE relay_claim(1000, 9223372036854775807)")  # the plan, now
        await event_store.append_batch([(f"t{i}", [paid(str(i), "c")], NO_STREAM) for i in range(5000)])
        claiming = conn.transaction()
        await claiming.start()
        (row,) = await conn.fetch("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE relay_claim(1000, 9223372036854775807)")
        await claiming.rollback()
        await conn.execute("DEALLOCATE relay_claim")

    nodes = scans(json.loads(row[0])[0]["Plan"])
    assert {(n["Relation Name"], n["Node Type"]) for n in nodes if "Relation Name" in n} == {
        ("outbox", "Index Scan"), ("outbox", "Tid Scan"), ("outbox", "ModifyTable"), ("events", "Index Scan")}
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in nodes if n["Node Type"] == "Tid Scan") == 1000


async def sizes_in_outbox(pool: db.Pool) -> list[int]:
    """The stored bytes (data + metadata) of each event waiting in the outbox, in position order."""
    rows = await pool.fetch("SELECT octet_length(e.data) + octet_length(e.metadata) AS bytes FROM outbox o"
                            " JOIN events e USING (global_position) ORDER BY global_position")
    return [r["bytes"] for r in rows]


async def test_a_claim_stops_at_the_event_that_reaches_its_byte_budget(pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [cancelled(str(i), "c", "x" * 10_000)], NO_STREAM) for i in range(10)])
    sizes = await sizes_in_outbox(pool)
    budget = sum(sizes[:3]) + 1  # the fourth event reaches it

    async with pool.acquire() as conn, conn.transaction():
        claimed = await outbox.claim(conn, 1000, budget)

    assert len(claimed) == 4
    assert [r["reached"] for r in claimed] == [False, False, False, True]


async def test_a_claim_takes_one_event_bigger_than_its_byte_budget(pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [cancelled(str(i), "c", "x" * 10_000)], NO_STREAM) for i in range(3)])

    async with pool.acquire() as conn, conn.transaction():
        claimed = await outbox.claim(conn, 1000, 1024)

    assert [r["reached"] for r in claimed] == [True]


async def test_a_claim_under_its_byte_budget_takes_every_row_up_to_its_limit(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [cancelled(str(i), "c", "x" * 10_000)], NO_STREAM) for i in range(10)])

    async with pool.acquire() as conn, conn.transaction():
        claimed = await outbox.claim(conn, 1000, sum(await sizes_in_outbox(pool)) + 1)

    assert len(claimed) == 10
    assert not any(r["reached"] for r in claimed)


async def positions_in_outbox(pool: db.Pool) -> list[int]:
    return [r["global_position"] for r in await pool.fetch("SELECT global_position FROM outbox ORDER BY 1")]


async def test_a_committed_claim_deletes_the_rows_it_returned_and_leaves_those_past_its_budget(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [cancelled(str(i), "c", "x" * 10_000)], NO_STREAM) for i in range(10)])
    before = await positions_in_outbox(pool)
    budget = sum((await sizes_in_outbox(pool))[:3]) + 1

    async with pool.acquire() as conn, conn.transaction():
        claimed = await outbox.claim(conn, 6, budget)

    assert [r["global_position"] for r in claimed] == before[:4]
    assert await positions_in_outbox(pool) == before[4:]


async def test_a_rolled_back_claim_leaves_every_row_in_the_outbox(pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [paid(str(i), "c")], NO_STREAM) for i in range(5)])
    before = await positions_in_outbox(pool)

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        claimed = await outbox.claim(conn, 1000)
        await tx.rollback()

    assert len(claimed) == 5
    assert await positions_in_outbox(pool) == before


async def test_rows_a_claim_holds_are_skipped_by_another_claim_until_it_ends(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append_batch([(f"s{i}", [paid(str(i), "c")], NO_STREAM) for i in range(5)])
    before = await positions_in_outbox(pool)

    async with pool.acquire() as conn, conn.transaction():
        first = await outbox.claim(conn, 3)
        async with pool.acquire() as other, other.transaction():
            second = await outbox.claim(other, 1000)

    assert [r["global_position"] for r in first] == before[:3]
    assert [r["global_position"] for r in second] == before[3:]
    assert await positions_in_outbox(pool) == []

"""The relay's claim: its cost follows the rows it claims, never the size of the store."""

from __future__ import annotations

import json
from typing import Any

from store import NO_STREAM, EventStore, db, outbox
from tests.unit.test_projection_fold import cancelled, paid


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

"""``eventfleet status`` on partitions: partitions per owner, the slowest partitions, ``--partitions`` for all."""

from __future__ import annotations

import json

from store import NO_STREAM, EventStore
from store.partitions import partition_of
from tests.conftest import PARTITIONS
from tests.unit.test_projection_fold import paid, placed
from workers.projector.leases import LeaseKeeper

PROJECTIONS = ["customer_stats", "order_summary"]


async def two_workers(pool, schema) -> tuple[LeaseKeeper, LeaseKeeper]:
    """Workers a and b holding 2 partitions of each projection each (their ticks, no processes)."""
    a = LeaseKeeper(pool, schema, PROJECTIONS, PARTITIONS, worker="host:1:a")
    b = LeaseKeeper(pool, schema, PROJECTIONS, PARTITIONS, worker="host:2:b")
    await a.tick()
    await b.tick()
    for projection, partitions in (await a.tick()).surplus.items():
        await a.release(projection, partitions)
    await b.tick()
    return a, b


async def test_status_shows_each_workers_partitions_and_the_slowest_partitions(pool, schema, prefix, run_cli):
    a, _ = await two_workers(pool, schema)
    await event_store_append(pool, schema)
    ran = await run_cli("status", schema=schema, prefix=prefix)
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert "workers: 2 live, 4 partitions per projection" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    assert lines[header].split() == ["WORKER", "HEARTBEAT", "CUSTOMER_STATS", "ORDER_SUMMARY"]
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["host:1:a", "host:2:b"]
    assert [line.split()[-2:] for line in lines[header + 1:header + 3]] == [["2", "2"], ["2", "2"]]
    slowest = lines[lines.index("slowest partitions (--partitions for all):") + 2:]
    hot = partition_of("order-hot", PARTITIONS)
    owner = "host:1:a" if hot in a.held["customer_stats"] else "host:2:b"
    assert slowest[0].split() == ["customer_stats", str(hot), owner, "3"]
    assert slowest[1].split() == ["order_summary", str(hot), owner, "3"]
    assert len(slowest) == 5


async def test_status_partitions_lists_every_partition_of_every_projection(pool, schema, prefix, run_cli):
    await two_workers(pool, schema)
    ran = await run_cli("status", "--partitions", schema=schema, prefix=prefix)
    assert ran.code == 0, ran.err
    listed = ran.out.splitlines()[ran.out.splitlines().index("partitions:") + 2:]
    assert sorted((line.split()[0], int(line.split()[1])) for line in listed) == sorted(
        (p, n) for p in PROJECTIONS for n in range(PARTITIONS))


async def test_status_json_has_the_workers_and_every_partitions_owner_and_lag(pool, schema, prefix, run_cli):
    a, _ = await two_workers(pool, schema)
    await event_store_append(pool, schema)
    ran = await run_cli("status", "--json", schema=schema, prefix=prefix)
    report = json.loads(ran.out)
    assert report["partitions"] == PARTITIONS
    assert [(w["worker_id"], w["live"], w["partitions"]) for w in report["workers"]] == [
        ("host:1:a", True, {"customer_stats": 2, "order_summary": 2}),
        ("host:2:b", True, {"customer_stats": 2, "order_summary": 2})]
    lags = {(p["projection"], p["partition"]): (p["owner"], p["lag_events"]) for p in report["partition_lags"]}
    hot = partition_of("order-hot", PARTITIONS)
    owner = "host:1:a" if hot in a.held["customer_stats"] else "host:2:b"
    assert lags[("customer_stats", hot)] == (owner, 3)
    assert sum(lag for _, lag in lags.values()) == 6
    assert len(lags) == 2 * PARTITIONS


async def test_a_partition_nobody_holds_shows_no_owner(pool, schema, prefix, run_cli):
    a = LeaseKeeper(pool, schema, ["customer_stats"], PARTITIONS, worker="host:1:a")
    await a.tick()
    await a.release("customer_stats", [0])
    report = json.loads((await run_cli("status", "--json", schema=schema, prefix=prefix)).out)
    owners = {(p["projection"], p["partition"]): p["owner"] for p in report["partition_lags"]}
    assert owners[("customer_stats", 0)] is None
    assert owners[("customer_stats", 1)] == "host:1:a"


async def event_store_append(pool, schema) -> None:
    """3 unapplied events in one partition (order-hot's)."""
    store = EventStore(pool, schema=schema)
    await store.append("order-hot", [placed("hot", "c"), paid("hot", "c"), paid("hot", "c")], NO_STREAM)

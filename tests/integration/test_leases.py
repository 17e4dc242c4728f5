"""Leased partitions: fair shares within one, handover on join and leave, expiry of a silent worker."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from store import db
from workers.projector import leases
from workers.projector.leases import LeaseKeeper, fair_share

P = 4
PROJECTIONS = ["customer_stats", "order_summary"]


@given(partitions=st.integers(1, 4096), workers=st.integers(1, 64))
def test_fair_shares_add_up_to_the_partitions_and_differ_by_at_most_one(partitions: int, workers: int) -> None:
    shares = [fair_share(partitions, workers, i) for i in range(workers)]
    assert sum(shares) == partitions
    assert max(shares) - min(shares) <= 1


def keeper(pool: db.Pool, schema: str, name: str, *, lease_seconds: float = 15.0,
           projections: list[str] | None = None) -> LeaseKeeper:
    return LeaseKeeper(pool, schema, projections or PROJECTIONS, P, lease_seconds=lease_seconds, worker=name)


async def test_a_lone_worker_takes_every_partition_of_every_projection_on_its_first_tick(pool, schema):
    a = keeper(pool, schema, "a")
    tick = await a.tick()
    assert tick.acquired == {p: [0, 1, 2, 3] for p in PROJECTIONS}
    assert tick.settled
    assert a.held == {p: {0, 1, 2, 3} for p in PROJECTIONS}


async def test_a_joining_worker_gets_its_share_once_the_other_gives_its_surplus_up(pool, schema):
    a, b = keeper(pool, schema, "a"), keeper(pool, schema, "b")
    await a.tick()
    joined = await b.tick()
    assert joined.acquired == {}
    assert not joined.settled
    over = await a.tick()
    assert over.surplus == {p: [2, 3] for p in PROJECTIONS}
    for projection, partitions in over.surplus.items():
        await a.release(projection, partitions)
    taken = await b.tick()
    assert taken.acquired == {p: [2, 3] for p in PROJECTIONS}
    assert (await a.tick()).settled
    assert (await b.tick()).settled
    assert a.held == {p: {0, 1} for p in PROJECTIONS}
    assert b.held == {p: {2, 3} for p in PROJECTIONS}


async def test_three_workers_on_four_partitions_hold_two_one_and_one(pool, schema):
    workers = [keeper(pool, schema, name, projections=["customer_stats"]) for name in ("a", "b", "c")]
    for _ in range(3):  # join, give up surpluses, claim
        for w in workers:
            tick = await w.tick()
            for projection, partitions in tick.surplus.items():
                await w.release(projection, partitions)
    held = [w.held["customer_stats"] for w in workers]
    assert sorted(len(h) for h in held) == [1, 1, 2]
    assert set().union(*held) == {0, 1, 2, 3}


async def test_a_worker_that_leaves_frees_its_partitions_for_the_next_tick_of_the_others(pool, schema):
    a, b = keeper(pool, schema, "a"), keeper(pool, schema, "b")
    await a.tick()
    await b.tick()
    await a.leave()
    tick = await b.tick()
    assert tick.acquired == {p: [0, 1, 2, 3] for p in PROJECTIONS}
    assert await pool.fetchval("SELECT count(*) FROM workers WHERE worker_id = 'a'") == 0


async def test_the_leases_of_a_silent_worker_expire_and_go_to_the_others(pool, schema):
    a = keeper(pool, schema, "a", lease_seconds=1.0)
    b = keeper(pool, schema, "b", lease_seconds=1.0)
    await a.tick()
    assert (await b.tick()).acquired == {}
    await asyncio.sleep(1.2)  # a stops ticking: killed, or paused longer than its lease
    tick = await b.tick()
    assert tick.acquired == {p: [0, 1, 2, 3] for p in PROJECTIONS}


async def test_a_worker_whose_lease_expired_and_was_taken_hears_it_lost(pool, schema):
    a = keeper(pool, schema, "a", lease_seconds=1.0)
    b = keeper(pool, schema, "b", lease_seconds=1.0)
    await a.tick()
    await asyncio.sleep(1.2)
    await b.tick()
    tick = await a.tick()
    assert tick.lost == {p: [0, 1, 2, 3] for p in PROJECTIONS}
    assert a.held == {p: set() for p in PROJECTIONS}


async def test_release_gives_up_only_the_named_partitions(pool, schema):
    a = keeper(pool, schema, "a")
    await a.tick()
    await a.release("customer_stats", [1, 3])
    owners = {(lease.projection, lease.partition): lease.owner for lease in await leases.owners(pool)}
    assert owners[("customer_stats", 1)] is None
    assert owners[("customer_stats", 3)] is None
    assert owners[("customer_stats", 0)] == owners[("order_summary", 3)] == "a"


async def test_every_change_of_owner_is_a_new_generation(pool, schema):
    a, b = keeper(pool, schema, "a"), keeper(pool, schema, "b")
    await a.tick()
    await a.leave()
    await b.tick()
    generations = {(lease.projection, lease.partition): lease.generation for lease in await leases.owners(pool)}
    assert set(generations.values()) == {2}


async def test_a_worker_running_one_projection_takes_no_share_of_another(pool, schema):
    a = keeper(pool, schema, "a", projections=["customer_stats"])
    b = keeper(pool, schema, "b", projections=["customer_stats", "order_summary"])
    await a.tick()
    tick = await b.tick()
    assert tick.acquired == {"order_summary": [0, 1, 2, 3]}  # customer_stats: a holds it until it gives 2 up

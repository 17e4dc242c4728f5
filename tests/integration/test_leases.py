"""Leased partitions: fair shares within one, handover on join and leave, expiry of a silent worker."""

from __future__ import annotations

import asyncio

import aio_pika
from hypothesis import given
from hypothesis import strategies as st

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import db
from store.event_store import EventStore
from tests.conftest import AMQP_URL, DATABASE_URL
from workers.config import Settings
from workers.projector import leases
from workers.projector.batcher import Stats
from workers.projector.fleet import Fleet, _Running
from workers.projector.leases import LeaseKeeper, fair_share
from workers.runtime import health

P = 4
PROJECTIONS = ["customer_stats", "order_summary"]


@given(partitions=st.integers(1, 4096), workers=st.integers(1, 64))
def test_fair_shares_add_up_to_the_partitions_and_differ_by_at_most_one(partitions: int, workers: int) -> None:
    shares = [fair_share(partitions, workers, i) for i in range(workers)]
    assert sum(shares) == partitions
    assert max(shares) - min(shares) <= 1


def keeper(pool: db.Pool, schema: str, name: str, *, lease_seconds: float = 15.0,
           projections: list[str] | None = None, wait_for_peers: bool = False) -> LeaseKeeper:
    return LeaseKeeper(pool, schema, projections or PROJECTIONS, P, lease_seconds=lease_seconds, worker=name,
                       wait_for_peers=wait_for_peers)


async def test_a_lone_worker_takes_every_partition_of_every_projection_on_its_first_tick(pool, schema):
    a = keeper(pool, schema, "a")
    tick = await a.tick()
    assert tick.acquired == {p: [0, 1, 2, 3] for p in PROJECTIONS}
    assert tick.settled
    assert a.held == {p: {0, 1, 2, 3} for p in PROJECTIONS}


async def test_workers_started_together_each_claim_their_share_without_a_handover(pool, schema):
    a, b = (keeper(pool, schema, name, wait_for_peers=True) for name in ("a", "b"))
    # a registers alone, b joins; each claims once it saw the same live workers two ticks running.
    ticks = [await w.tick() for _ in range(3) for w in (a, b)]
    assert [t.surplus for t in ticks] == [{}] * 6
    assert [t.acquired for t in ticks] == [{}, {}, {}, {p: [0, 1] for p in PROJECTIONS},
                                           {p: [2, 3] for p in PROJECTIONS}, {}]
    assert ((await a.tick()).settled, (await b.tick()).settled) == (True, True)


async def test_a_worker_waiting_for_peers_claims_everything_once_none_registered_over_a_tick(pool, schema):
    a = keeper(pool, schema, "a", wait_for_peers=True)
    assert (await a.tick()).acquired == {}
    assert (await a.tick()).acquired == {p: [0, 1, 2, 3] for p in PROJECTIONS}


async def test_a_worker_over_its_share_tells_every_surplus_consumer_to_leave_before_waiting_for_any(
        pool, schema, prefix):
    # Each surplus consumer here ends only once every surplus consumer was told to leave: a fleet that stopped
    # them one after the other (waiting for each one's batch in flight) would never get past the first.
    a, b = keeper(pool, schema, "a"), keeper(pool, schema, "b")
    await a.tick()
    await b.tick()
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    connection = await aio_pika.connect(AMQP_URL)
    fleet = Fleet(EventStore(pool, schema=schema), connection, a, [CustomerStats(), OrderSummary()], settings,
                  health.Health(), {p: Stats() for p in PROJECTIONS})
    surplus = {(p, n): asyncio.Event() for p in PROJECTIONS for n in (2, 3)}

    async def consuming(leave: asyncio.Event) -> None:
        await leave.wait()
        if any(leave is told for told in surplus.values()):
            await asyncio.gather(*(told.wait() for told in surplus.values()))

    try:
        for p in PROJECTIONS:
            for n in range(P):
                leave = surplus.get((p, n), asyncio.Event())
                channel = await connection.channel()
                fleet.running[(p, n)] = _Running([], [asyncio.create_task(consuming(leave))], leave, channel)
        tick = await a.tick()
        assert tick.surplus == {p: [2, 3] for p in PROJECTIONS}
        async with asyncio.timeout(30):  # a guard against the deadlock above, not a measurement
            await fleet._follow(tick, asyncio.Event())
        assert sorted(fleet.running) == [(p, n) for p in PROJECTIONS for n in (0, 1)]
        assert (await b.tick()).acquired == {p: [2, 3] for p in PROJECTIONS}
    finally:
        for running in fleet.running.values():
            for task in running.tasks:
                task.cancel()
        await fleet.copies.close()
        await connection.close()


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

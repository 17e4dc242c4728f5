"""A worker group (EVENTFLEET_GROUP) as real processes: one queue per partition feeds every read model of the group
(docs/reference.md 6.0, topology (2)); the read models stay exact through scaling and kills; the broker holds P
queues however many read models the group runs; teardown removes them."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from store import EventStore, db
from tests.conftest import AMQP_URL, DATABASE_URL, new_prefix, new_schema
from tests.e2e.test_partition_fleet import (
    ENV,
    LEASE_SECONDS,
    MODULES,
    PARTITIONS,
    PROJECTIONS,
    Fleet,
    Writer,
    all_applied,
    assert_exact,
    deployment,
    overlaps,
    until,
)
from workers import broker
from workers.config import Settings
from workers.fleet import open_fleet
from workers.projector import leases

pytestmark = pytest.mark.slow

GROUP = "main"
LEASE = broker.group_lease(GROUP)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """test_partition_fleet's deployment, its processes in the worker group ``main``; torn down after."""
    async with deployment(tmp_path, GROUP) as f:
        yield f


@pytest.fixture
async def pool(fleet: Fleet) -> AsyncIterator[db.Pool]:
    async with db.create_pool(DATABASE_URL, fleet.schema, min_size=1, max_size=4) as p:
        yield p


async def group_shares(pool: db.Pool) -> collections.Counter[str]:
    """The group's partitions per live owner's pid; every other lease (a projection's) counted under its name."""
    held: collections.Counter[str] = collections.Counter()
    for lease in await leases.owners(pool):
        if lease.owner is not None and lease.live:
            held[lease.owner.split(":")[1] if lease.projection == LEASE else lease.projection] += 1
    return held


async def balanced(pool: db.Pool, pids: set[int]) -> bool:
    held = await group_shares(pool)
    return ({int(k) for k in held} == pids and sum(held.values()) == PARTITIONS
            and max(held.values()) - min(held.values()) <= 1)


async def existing(prefix: str, names: list[str]) -> list[str]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        return [n for n in names if await broker.passive_queue(connection, n) is not None]


async def test_a_group_of_two_workers_applies_every_event_once_to_each_read_model_from_one_queue_per_partition(
        fleet, pool):
    fleet.start_relay()
    pids = {fleet.start_worker() for _ in range(2)}
    await until(lambda: balanced(pool, pids), 30, fleet, "the group's fair shares")
    await Writer(EventStore(pool, schema=fleet.schema), "group").write(300)
    await until(lambda: all_applied(pool), 60, fleet, "everything applied")
    await assert_exact(pool)
    names = broker.Names(fleet.prefix)
    assert await existing(fleet.prefix, [names.group_queue(GROUP, p) for p in range(PARTITIONS)]) == [
        names.group_queue(GROUP, p) for p in range(PARTITIONS)]
    # No read model has queues of its own but its dead-letter queue.
    assert await existing(fleet.prefix, [names.partition_queue(p, n) for p in PROJECTIONS for n in range(PARTITIONS)]
                          ) == []
    assert await existing(fleet.prefix, [names.dead_letter_queue(p) for p in PROJECTIONS]) == [
        names.dead_letter_queue(p) for p in PROJECTIONS]
    fleet.stop_all()
    assert (fleet.total("duplicates"), fleet.total("gaps_filled")) == (0, 0)


async def test_scaling_a_group_one_to_three_to_one_under_load_keeps_its_read_models_exact(fleet, pool):
    fleet.start_relay()
    first = fleet.start_worker()
    await until(lambda: balanced(pool, {first}), 30, fleet, "one worker holding the group")
    writer = Writer(EventStore(pool, schema=fleet.schema), "scale")
    writing = asyncio.create_task(writer.run(per_second=400))
    try:
        await asyncio.sleep(2)
        pids = {first} | {fleet.start_worker() for _ in range(2)}
        await until(lambda: balanced(pool, pids), 20, fleet, "three fair shares")
        await asyncio.sleep(2)
        for pid in sorted(pids - {first}):
            fleet.stop(pid)  # SIGTERM: hands its partitions over
            pids.discard(pid)
        await until(lambda: balanced(pool, pids), 10, fleet, "one worker again")
        await asyncio.sleep(1)
    finally:
        writer.stopping.set()
        await writing
    await until(lambda: all_applied(pool), 60, fleet, "everything applied")
    await assert_exact(pool)
    batches = await pool.fetch("SELECT partition, pid, events, started_at, ended_at FROM batch_recorder")
    assert {b["pid"] for b in batches} > {first}
    assert overlaps(batches) == []
    fleet.stop_all()
    assert (fleet.total("duplicates"), fleet.total("gaps_filled")) == (0, 0)


async def test_a_killed_group_worker_loses_nothing_and_doubles_nothing_in_any_read_model(fleet, pool):
    fleet.start_relay()
    pids = {fleet.start_worker() for _ in range(2)}
    await until(lambda: balanced(pool, pids), 30, fleet, "the group's fair shares")
    writer = Writer(EventStore(pool, schema=fleet.schema), "kill")
    writing = asyncio.create_task(writer.run(per_second=600))
    try:
        await asyncio.sleep(3)
        victim = min(pids)
        fleet.stop(victim, kill=True)
        pids.discard(victim)
        await until(lambda: balanced(pool, pids), LEASE_SECONDS + 5, fleet, "taken over")
        await asyncio.sleep(1)
    finally:
        writer.stopping.set()
        await writing
    await until(lambda: all_applied(pool), 60, fleet, "everything applied")
    await assert_exact(pool)  # batch_recorder counted every event once: the redeliveries were duplicates


async def test_teardown_removes_the_groups_queues(tmp_path):
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=new_schema(), prefix=new_prefix(),
                        partitions=PARTITIONS, projection_modules=MODULES, group=GROUP)
    names = broker.Names(settings.prefix)
    queues = [names.group_queue(GROUP, p) for p in range(PARTITIONS)]
    async with open_fleet(settings, tmp_path, env=ENV, projections=PROJECTIONS) as processes:
        processes.add("relay", env={"EVENTFLEET_AMQP_URL": AMQP_URL}).start()  # it declares the group's queues
        for _ in range(200):
            if await existing(settings.prefix, queues) == queues:
                break
            await asyncio.sleep(0.1)
        assert await existing(settings.prefix, queues) == queues
    assert await existing(settings.prefix, queues) == []

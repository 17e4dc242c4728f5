"""payment_timeout on 3 worker processes killed and restarted under load: every follow-up exactly once, every
deadline fired exactly once or cancelled."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from eventfleet.examples.orders import orders
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid
from eventfleet.examples.orders.reactors import REASON, PaymentTimeout
from projections import registry
from store import NO_STREAM, EventStore, db
from store.aggregate import Repository
from store.event_store import record_from_row
from tests.conftest import AMQP_URL, DATABASE_URL, new_prefix, new_schema
from tests.unit.test_projection_fold import placed
from workers import admin, broker
from workers.runtime import retry

pytestmark = pytest.mark.slow

# Importing the reactors module registered payment_timeout in this process, for every later test's relay and
# migrate: this module only needs its constants (its processes load the module themselves).
registry.REGISTRY.pop(PaymentTimeout.name, None)

PARTITIONS = 8
MODULE = "eventfleet.examples.orders.reactors"
TIMEOUT_SECONDS = 2.0
RETRYABLE: tuple[type[BaseException], ...] = (*retry.OUTAGE_ERRORS, asyncpg.PostgresError)


class Processes:
    def __init__(self, schema: str, prefix: str, logs: Path) -> None:
        self.schema, self.prefix, self.logs = schema, prefix, logs
        self.workers: dict[int, subprocess.Popen[str]] = {}
        self.others: list[subprocess.Popen[str]] = []
        self.started = 0

    def start(self, role: str, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
               "EVENTFLEET_SCHEMA": self.schema, "EVENTFLEET_PREFIX": self.prefix, "EVENTFLEET_HTTP_PORT": "0",
               "EVENTFLEET_PROJECTION_MODULES": MODULE, "EVENTFLEET_LEASE_SECONDS": "4",
               "EVENTFLEET_RELAY_POLL_MS": "100",
               "EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS)}
        self.started += 1
        fd = os.open(self.logs / f"{role}-{self.started}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            return subprocess.Popen([sys.executable, "-m", "workers", role, *args], env=env,
                                    stdout=subprocess.DEVNULL, stderr=fd, text=True)
        finally:
            os.close(fd)

    def worker(self) -> None:
        proc = self.start("worker", "--projection", "payment_timeout")
        self.workers[proc.pid] = proc

    def kill(self, pid: int) -> None:
        proc = self.workers.pop(pid)
        proc.kill()
        proc.wait()

    def reap(self) -> None:
        for proc in [*self.workers.values(), *self.others]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers.values(), *self.others]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Processes]:
    schema, prefix = new_schema(), new_prefix()
    await admin.run_migrate(DATABASE_URL, schema, partitions=PARTITIONS)
    procs = Processes(schema, prefix, tmp_path)
    try:
        yield procs
    finally:
        procs.reap()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await broker.delete_topology(await connection.channel(), broker.Names(prefix), ["payment_timeout"],
                                         PARTITIONS)
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def test_follow_ups_and_deadlines_are_exactly_once_under_kills_and_restarts(deployment: Processes):
    procs = deployment
    procs.others.append(procs.start("relay"))
    for _ in range(3):
        procs.worker()
    rng = random.Random(5)
    async with db.create_pool(DATABASE_URL, procs.schema, min_size=1, max_size=6) as pool:
        store = EventStore(pool, schema=procs.schema)
        repository = Repository(store, orders.Order)
        paid_in_time: set[str] = set()
        refused_payments = 0
        ready = time.monotonic() + 60
        while await pool.fetchval("SELECT count(*) FROM leases WHERE owner IS NOT NULL AND expires_at > now()") \
                < PARTITIONS:
            assert time.monotonic() < ready, f"the workers hold no partitions; logs in {procs.logs}"
            await asyncio.sleep(0.1)

        async def customer(i: int) -> None:
            nonlocal refused_payments
            sid = f"order-{i}"
            await store.append(sid, [placed(str(i), f"c{i % 5}")], NO_STREAM)
            if rng.random() < 0.5:  # half pay, some in time, some racing the timeout, some too late
                await asyncio.sleep(rng.uniform(0, 2 * TIMEOUT_SECONDS))
                try:
                    await repository.execute(sid, orders.pay())
                    paid_in_time.add(sid)
                except orders.InvalidTransition:
                    refused_payments += 1

        async def killer() -> None:
            for _ in range(4):
                await asyncio.sleep(2.5)
                procs.kill(rng.choice(sorted(procs.workers)))
                await asyncio.sleep(0.5)
                procs.worker()

        customers = [asyncio.create_task(customer(i)) for i in range(160)]
        chaos = asyncio.create_task(killer())
        await asyncio.gather(*customers)
        await chaos
        deadline = time.monotonic() + 90
        while True:
            try:
                pending = await pool.fetchval("SELECT count(*) FROM deadlines")
                unapplied = await pool.fetchval(
                    "SELECT count(*) FROM (SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id) s "
                    "LEFT JOIN checkpoints c ON c.projection = 'payment_timeout' AND c.stream_id = s.stream_id "
                    "WHERE c.version IS NULL OR c.version < s.v")
                if pending == 0 and unapplied == 0:
                    break
            except RETRYABLE:
                pass
            assert time.monotonic() < deadline, f"pending {pending}, unapplied {unapplied}; logs in {procs.logs}"
            await asyncio.sleep(0.2)
        rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                                "recorded_at, transaction_id FROM events ORDER BY global_position")
    events = [record_from_row(r) for r in rows]
    by_stream: dict[str, list[type]] = collections.defaultdict(list)
    timeouts: collections.Counter[str] = collections.Counter()
    follow_ups_by_cause: collections.Counter[str] = collections.Counter()
    for e in events:
        by_stream[e.stream_id].append(type(e.event))
        if isinstance(e.event, OrderCancelled):
            assert e.event.reason == REASON
            timeouts[e.stream_id] += 1
            follow_ups_by_cause[e.metadata["causation_id"]] += 1
    assert [c for c, n in follow_ups_by_cause.items() if n != 1] == []  # one follow-up per fired deadline
    for sid, types in by_stream.items():
        if sid in paid_in_time:
            assert (timeouts[sid], types.count(OrderPaid)) == (0, 1), sid
        else:  # never paid, or paid too late: cancelled by its timeout exactly once
            assert (timeouts[sid], types.count(OrderPaid)) == (1, 0), sid
    assert len(by_stream) == 160
    assert sum(timeouts.values()) == 160 - len(paid_in_time)
    print(f"{len(paid_in_time)} paid in time, {sum(timeouts.values())} cancelled by timeout, "
          f"{refused_payments} payments refused as too late")

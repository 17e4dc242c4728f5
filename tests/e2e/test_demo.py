"""``eventfleet demo`` as a process: exit 0 with every row matched, and a clear failure without RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import aio_pika
import asyncpg
import pytest

from tests.conftest import AMQP_URL, DATABASE_URL
from tests.integration.test_relay_helpers import topology_names
from workers import broker

pytestmark = pytest.mark.slow


async def demo(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL, **env}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "demo", *args, env=environ,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_demo_runs_the_fleet_verifies_every_row_and_cleans_up():
    result = await demo("--orders", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "result: OK" in out
    assert re.search(r"order_summary\s+200 rows\s+match", out)
    assert re.search(r"customer_stats\s+[\d,]+ rows\s+match", out)
    assert re.search(r"end to end:\s+p50 [\d,]+ ms, p99 [\d,]+ ms", out)
    # Each subscriber's latency apart, read models and the reactor, after the leases were dealt.
    subscribers = re.findall(r"^\s+(\w+)\s+p50\s+[\d,]+ ms, p99\s+[\d,]+ ms\s+\((reactor|read model),", out, re.MULTILINE)
    assert dict(subscribers) == {"customer_stats": "read model", "order_summary": "read model",
                                 "payment_timeout": "reactor"}
    assert re.search(r"3 workers ready after [\d.]+s, their leases dealt [\d.]+s later", out)
    assert re.search(r"[\d,]+ duplicates skipped, [\d,]+ gaps filled", out)
    assert "lag 0 events" in result.stderr
    found = re.search(r"schema and prefix (eventfleet_demo_\w+)", out)
    assert found
    name = found.group(1)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        assert not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname LIKE $1)",
                                       f"{name}%")
    finally:
        await conn.close()
    # Nothing of the demo's topology is left: every projection's partition queues and DLQ, the exchanges.
    queues, exchanges = topology_names(name)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        assert [q for q in queues if await broker.passive_queue(connection, q) is not None] == []
        assert [x for x in exchanges if await broker.exchange_exists(connection, x)] == []


@pytest.mark.parametrize(("variable", "url", "shown", "hint"), [
    ("EVENTFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/",
     "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/", "rabbitmq-server -detached"),
    ("EVENTFLEET_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/test",
     "PostgreSQL is not reachable at postgresql://postgres@127.0.0.1:1/test", "pg_ctlcluster"),
])
async def test_demo_names_the_missing_service_and_how_to_start_it(variable, url, shown, hint):
    result = await demo(**{variable: url})
    assert result.returncode != 0
    assert result.stderr.startswith(f"eventfleet demo: {shown}"), result.stderr
    assert hint in result.stderr
    assert "result:" not in result.stdout

"""The README's publication ("Integration events") runs as written, and its consumer, plain aio-pika in a process
of its own, receives every published event in stream order with the events' ids, counted against the store:
also through a SIGKILL of the relay and of the worker. The broker restart is done on a RabbitMQ node of
the test's own, never the machine's shared one.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from eventfleet.examples.orders.events import OrderPaid, OrderPlaced
from store import NO_STREAM, EventStore, db
from tests.cluster.rabbit import RabbitCluster
from tests.conftest import AMQP_URL, DATABASE_URL
from tests.e2e import readme
from tests.unit.test_projection_fold import paid, placed, shipped

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: The ports of the broker-restart test's own RabbitMQ node (the cluster tests use 5681.., 25681..).
OWN_AMQP_PORT, OWN_DIST_PORT = 5791, 25791
TYPES = {OrderPlaced: "billing.order_placed.v1", OrderPaid: "billing.order_paid.v1"}


def files() -> dict[str, str]:
    found = dict(readme.blocks(readme.section("Integration events: other services hear about our events"), "python"))
    assert set(found) == {"file=billing_out.py", "file=consumer.py"}
    return {name.removeprefix("file="): body for name, body in found.items()}


@pytest.fixture
def service(tmp_path: Path) -> Path:
    for name, body in files().items():
        (tmp_path / name).write_text(body)
    return tmp_path


@pytest.fixture
def env(service: Path) -> Iterator[dict[str, str]]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    values = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
              "EVENTFLEET_SCHEMA": name, "EVENTFLEET_PREFIX": f"test.{name}", "EVENTFLEET_HTTP_PORT": "0",
              "EVENTFLEET_PROJECTION_MODULES": "billing_out", "EVENTFLEET_RELAY_POLL_MS": "100",
              "EVENTFLEET_LEASE_SECONDS": "3", "PYTHONPATH": str(service),
              "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(BIN / "eventfleet"), "migrate"], env=values, cwd=service, check=True, capture_output=True,
                   timeout=120)
    yield values
    subprocess.run([str(BIN / "eventfleet"), "teardown", "--yes", "--force"], env=values, cwd=service,
                   capture_output=True, check=False, timeout=60)
    subprocess.run(["psql", DATABASE_URL, "-qc", f'DROP SCHEMA IF EXISTS "{name}" CASCADE'], capture_output=True,
                   check=False)


def start(role: str, env: dict[str, str], cwd: Path, n: int = 0) -> subprocess.Popen[str]:
    with (cwd / f"{role}.{n}.log").open("w") as log:
        return subprocess.Popen([str(BIN / "eventfleet"), role], env=env, cwd=cwd, text=True,
                                stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture
def consumer_on(service: Path, env: dict[str, str]) -> Iterator[Any]:
    """Start the README's consumer on a queue of the test's own (deleted after it), expecting ``count`` events."""
    queue = f"{env['EVENTFLEET_PREFIX']}.billing"
    started: list[subprocess.Popen[str]] = []

    urls: list[str] = []

    def launch(url: str, count: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "consumer.py", url, f"{env['EVENTFLEET_PREFIX']}.integration",
                                 queue, "billing.#", str(count)], cwd=service, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={k: v for k, v in env.items() if k != "PYTHONPATH"})
        started.append(proc)
        return proc

    async def run(url: str, count: int) -> subprocess.Popen[str]:
        proc = launch(url, count)
        urls.append(url)
        deadline = time.monotonic() + 60
        while not await queue_exists(url, queue):  # bound before any event is published
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if AMQP_URL in urls:  # a node of the test's own is gone with its queue
        asyncio.run(delete_queue(queue))


@pytest.fixture
def consumer(consumer_on: Any) -> Any:
    """The README's consumer on the machine's broker."""
    return lambda count: consumer_on(AMQP_URL, count)


async def queue_exists(url: str, name: str) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        try:
            await (await connection.channel()).declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
    return True


async def delete_queue(name: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await (await connection.channel()).queue_delete(name)


def printed(proc: subprocess.Popen[str], within: float) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=within)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def published(store: EventStore, streams: list[str]) -> list[dict[str, Any]]:
    """What the consumer should print of these streams, stream by stream in version order."""
    return [{"id": str(e.event_id), "type": TYPES[type(e.event)], "subject": e.stream_id, "version": e.version}
            for sid in streams for e in await store.load(sid) if type(e.event) in TYPES]


def by_stream(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The consumer's lines regrouped by stream, each stream's in the order received, without the data."""
    order = sorted({line["subject"] for line in lines}, key=lambda s: int(s.removeprefix("order-")))
    return [{k: v for k, v in line.items() if k != "data"} for s in order for line in lines if line["subject"] == s]


def test_the_publication_and_the_consumer_type_check_strictly(service: Path) -> None:
    done = subprocess.run([str(BIN / "mypy"), "--strict", "--no-incremental", "billing_out.py", "consumer.py"],
                          cwd=service, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stdout


def test_the_consumer_imports_nothing_of_eventfleet() -> None:
    imported = [line for line in files()["consumer.py"].splitlines() if line.startswith(("import ", "from "))]
    assert imported == ["import asyncio", "import json", "import sys", "import aio_pika"]


async def test_the_readme_consumer_receives_every_published_event_in_stream_order(service, env, consumer):
    proc = await consumer(10)
    fleet = [start("relay", env, service), start("worker", env, service)]
    try:
        async with db.create_pool(DATABASE_URL, env["EVENTFLEET_SCHEMA"], min_size=1, max_size=2) as pool:
            store = EventStore(pool, schema=env["EVENTFLEET_SCHEMA"])
            for i in range(5):
                await store.append(f"order-{i}", [placed(str(i), "c"), paid(str(i), "c"), shipped(str(i), "c")],
                                   NO_STREAM)
            lines = await asyncio.to_thread(printed, proc, 120)
            expected = await published(store, [f"order-{i}" for i in range(5)])
    finally:
        for p in fleet:
            p.send_signal(signal.SIGTERM)
        for p in fleet:
            p.wait(30)
    assert by_stream(lines) == expected
    assert lines[0]["data"] == {"order": lines[0]["subject"].removeprefix("order-"), "customer": "c", "total": "10.00"}


async def test_the_consumer_gets_every_event_in_stream_order_through_kills_of_the_relay_and_the_worker(
        service, env, consumer):
    orders = 120
    proc = await consumer(2 * orders)
    relay, worker = start("relay", env, service), start("worker", env, service)
    try:
        async with db.create_pool(DATABASE_URL, env["EVENTFLEET_SCHEMA"], min_size=1, max_size=4) as pool:
            store = EventStore(pool, schema=env["EVENTFLEET_SCHEMA"])
            for i in range(orders):
                await store.append(f"order-{i}", [placed(str(i), "c")], NO_STREAM)
                if i == orders // 3:
                    relay.kill()
                    relay.wait(10)
                    relay = start("relay", env, service, 1)
                if i == 2 * orders // 3:
                    worker.kill()
                    worker.wait(10)
                    worker = start("worker", env, service, 1)
            for i in range(orders):
                await store.append(f"order-{i}", [paid(str(i), "c")], 0)
                if i == orders // 2:
                    worker.kill()
                    worker.wait(10)
                    relay.kill()
                    relay.wait(10)
                    worker, relay = start("worker", env, service, 2), start("relay", env, service, 2)
            lines = await asyncio.to_thread(printed, proc, 180)
            expected = await published(store, [f"order-{i}" for i in range(orders)])
    finally:
        for p in (relay, worker):
            p.send_signal(signal.SIGTERM)
        for p in (relay, worker):
            p.wait(30)
    assert by_stream(lines) == expected


async def test_the_consumer_gets_every_event_in_stream_order_through_a_broker_restart(service, env, consumer_on):
    """On a RabbitMQ node of the test's own (tests/cluster/rabbit.py; the machine's shared node is never
    touched), stopped and started again while events are written: the relay, the worker and the consumer
    reconnect, and the consumer still gets every event once, in order."""
    orders = 60
    with RabbitCluster(1, amqp_port=OWN_AMQP_PORT, dist_port=OWN_DIST_PORT, prefix="efpub") as rabbit:
        own = {**env, "EVENTFLEET_AMQP_URL": rabbit.amqp_url}
        proc = await consumer_on(rabbit.amqp_url, 2 * orders)
        relay, worker = start("relay", own, service), start("worker", own, service)
        try:
            async with db.create_pool(DATABASE_URL, env["EVENTFLEET_SCHEMA"], min_size=1, max_size=4) as pool:
                store = EventStore(pool, schema=env["EVENTFLEET_SCHEMA"])
                for i in range(orders):
                    await store.append(f"order-{i}", [placed(str(i), "c")], NO_STREAM)
                await asyncio.to_thread(rabbit.stop, rabbit.nodes[0])
                for i in range(orders):  # written while the broker is down: the outbox keeps them
                    await store.append(f"order-{i}", [paid(str(i), "c")], 0)
                await asyncio.to_thread(rabbit.start, rabbit.nodes[0])
                lines = await asyncio.to_thread(printed, proc, 300)
                expected = await published(store, [f"order-{i}" for i in range(orders)])
        finally:
            for p in (relay, worker):
                p.send_signal(signal.SIGTERM)
            for p in (relay, worker):
                p.wait(30)
    assert by_stream(lines) == expected

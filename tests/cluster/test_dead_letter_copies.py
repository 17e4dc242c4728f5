"""A broker alarm does not hold a consumer's acks: parked events' DLQ copies go out on a connection of their own.

A RabbitMQ node of this test's own (tests/cluster/rabbit.py, on ports no other cluster of the suite uses), its
memory alarm raised with ``set_vm_memory_high_watermark``: every connection that publishes is blocked, and the
broker stops reading from it. The machine's default node is never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import aio_pika
import pytest

from store import NO_STREAM
from store.partitions import partition_of
from tests.cluster.rabbit import HarnessError, RabbitCluster, unavailable
from tests.conftest import DATABASE_URL, PARTITIONS
from tests.integration.test_environment_errors import Counter, applied, other_order
from tests.unit.test_projection_fold import cancelled, paid, placed
from workers import broker
from workers.config import Settings
from workers.projector import parking
from workers.projector.consumer import Consumer
from workers.runtime import health

#: Ports apart from tests/cluster's shared cluster (5681...) and the machine's default node (5672).
AMQP_PORT, DIST_PORT = 5795, 25795


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitCluster]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    try:
        with RabbitCluster(size=1, amqp_port=AMQP_PORT, dist_port=DIST_PORT, prefix="efdlq") as cluster:
            yield cluster
    except HarnessError as exc:  # pragma: no cover - the machine cannot start a node here
        pytest.skip(f"cannot start a RabbitMQ node of our own: {exc}")


def unacked(cluster: RabbitCluster, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of ``queue``, as the node counts them."""
    out = cluster.ctl(cluster.nodes[0], "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged")
    for line in out.splitlines():
        name, ready, unacknowledged = line.split()
        if name == queue:
            return int(ready), int(unacknowledged)
    raise AssertionError(f"no queue {queue}: {out}")


async def test_a_broker_alarm_holds_no_acks_of_a_consumer_that_parks_an_event(node, pool, event_store, schema,
                                                                                prefix, caplog):
    url = node.nodes[0].url
    settings = Settings(database_url=DATABASE_URL, amqp_url=url, schema=schema, prefix=prefix, http_port=0)
    names = broker.Names(prefix)
    await pool.execute(Counter.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "no file"), paid("a", "c")],
                             NO_STREAM)
    events = [*await event_store.load("order-a"), *await other_order(event_store)]
    partition = partition_of("order-a", PARTITIONS)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await broker.declare_topology(channel, names, [Counter.name], PARTITIONS)
        exchange = await channel.get_exchange(names.partitions_exchange, ensure=False)
        await exchange.publish(broker.events_message(partition, events), routing_key=str(partition))
        consuming = await connection.channel()  # the consumer's: it only consumes and acks
        queue = names.partition_queue(Counter.name, partition)
        caplog.set_level(logging.WARNING, logger="workers.projector.dlq")
        consumer = Consumer(event_store, consuming, Counter(), partition, settings, health_=health.Health())
        await asyncio.to_thread(node.memory_alarm, node.nodes[0])
        try:
            run = asyncio.ensure_future(consumer.until_idle())
            done, _ = await asyncio.wait({run}, timeout=60)  # a bound on a hang, not a timing
            during_alarm = await asyncio.to_thread(unacked, node, queue)
        finally:
            await asyncio.to_thread(node.clear_memory_alarm, node.nodes[0])
        stats = await run
        assert done, "the consumer finished its batch while the alarm stood"
        # The batch is acked while the alarm stands: the consumer's connection published nothing.
        assert during_alarm == (0, 0)
        assert (stats.applied, stats.dead_lettered) == (4, 1)
        assert "DLQ copies not published (their dead letters are in the table)" in caplog.messages
        (row,) = await parking.list_parked(pool, Counter.name)
        assert (row["stream_id"], row["version"]) == ("order-a", 1)
        assert await applied(pool) == {"order-a": 1, events[-1].stream_id: 3}
        await broker.delete_topology(await connection.channel(), names, [Counter.name], PARTITIONS)

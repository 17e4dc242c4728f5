"""The partition and dead-letter queues' arguments: no message is dead-lettered by a broker's delivery limit.

RabbitMQ 4.x gives quorum queues a delivery limit of 20 by default; 3.10-3.13 read -1 as a limit of 0. The
queues are declared with ``broker.DELIVERY_LIMIT``, a limit no message reaches, on every version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from tests.conftest import AMQP_URL, Cleanup
from workers import broker

PROJECTION = "balances"
PARTITIONS = 2


@pytest.fixture
def declared(amqp: AbstractRobustConnection, prefix: str, cleanup: Cleanup
             ) -> Callable[..., Awaitable[None]]:
    """Declare the prefix's partitions of PROJECTION (on ``channel``, or one of its own; deleted after the test)."""
    names = broker.Names(prefix)

    async def undo() -> None:
        async with await aio_pika.connect(AMQP_URL) as connection:
            await broker.delete_partitions(await connection.channel(), names, [PROJECTION], PARTITIONS)

    async def declare(channel: AbstractChannel | None = None) -> None:
        cleanup(undo)
        await broker.declare_partitions(channel or await amqp.channel(), names, [PROJECTION], PARTITIONS)

    return declare


async def redeclare(amqp: AbstractRobustConnection, name: str, arguments: dict[str, object]) -> None:
    """Declare an existing queue again with ``arguments`` (PRECONDITION_FAILED unless they are its own)."""
    channel = await amqp.channel()
    await channel.declare_queue(name, durable=True, arguments=arguments)
    await channel.close()


async def test_partition_queues_are_declared_with_the_delivery_limit(
        amqp: AbstractRobustConnection, prefix: str, declared: Callable[..., Awaitable[None]]) -> None:
    await declared()
    names = broker.Names(prefix)
    arguments = broker.partition_queue_arguments(names, PROJECTION)
    assert arguments["x-delivery-limit"] == broker.DELIVERY_LIMIT == 2**31 - 1
    await redeclare(amqp, names.partition_queue(PROJECTION, 1), arguments)  # the same arguments: accepted
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-delivery-limit"):
        await redeclare(amqp, names.partition_queue(PROJECTION, 1),
                        {**arguments, "x-delivery-limit": broker.DELIVERY_LIMIT - 1})


async def test_dead_letter_queues_are_declared_with_the_delivery_limit(
        amqp: AbstractRobustConnection, prefix: str, declared: Callable[..., Awaitable[None]]) -> None:
    await declared()
    name = broker.Names(prefix).dead_letter_queue(PROJECTION)
    await redeclare(amqp, name, {"x-queue-type": "quorum", "x-delivery-limit": broker.DELIVERY_LIMIT})
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-delivery-limit"):
        await redeclare(amqp, name, {"x-queue-type": "quorum"})


async def returned(amqp: AbstractRobustConnection, queue_name: str, times: int) -> list[bytes]:
    """Consume ``queue_name`` one message at a time, return (nack, requeue) the first ``times`` deliveries;
    the bodies delivered after them, up to the queue's two messages acked."""
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=1)
    queue = await channel.declare_queue(queue_name, passive=True)
    after: asyncio.Queue[bytes] = asyncio.Queue()
    count = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count
        count += 1
        if count <= times:
            await message.nack(requeue=True)
        else:
            await message.ack()
            after.put_nowait(message.body)

    await queue.consume(on_message)
    bodies = [await asyncio.wait_for(after.get(), 10) for _ in range(2)]
    await channel.close()
    return bodies


async def test_a_message_returned_25_times_is_delivered_again_not_dead_lettered(
        amqp: AbstractRobustConnection, prefix: str, declared: Callable[..., Awaitable[None]]) -> None:
    await declared()
    names = broker.Names(prefix)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(names.partitions_exchange)
    for body in (b"first", b"second"):
        await exchange.publish(aio_pika.Message(body), routing_key="0", mandatory=True)
    assert await returned(amqp, names.partition_queue(PROJECTION, 0), 25) == [b"first", b"second"]
    dead = await broker.passive_queue(amqp, names.dead_letter_queue(PROJECTION))
    assert dead is not None
    assert dead.message_count == 0


async def test_a_returned_message_is_delivered_again_before_the_next(
        amqp: AbstractRobustConnection, prefix: str, declared: Callable[..., Awaitable[None]]) -> None:
    # A lease handover returns the prefetched messages: the next owner gets them first, in order.
    await declared()
    names = broker.Names(prefix)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(names.partitions_exchange)
    for body in (b"first", b"second"):
        await exchange.publish(aio_pika.Message(body), routing_key="1", mandatory=True)
    assert await returned(amqp, names.partition_queue(PROJECTION, 1), 1) == [b"first", b"second"]


async def test_a_queue_declared_without_the_delivery_limit_is_kept_as_it_is_and_named_in_a_warning(
        amqp: AbstractRobustConnection, prefix: str, declared: Callable[..., Awaitable[None]],
        caplog: pytest.LogCaptureFixture) -> None:
    names = broker.Names(prefix)
    old = {k: v for k, v in broker.partition_queue_arguments(names, PROJECTION).items() if k != "x-delivery-limit"}
    await redeclare(amqp, names.partition_queue(PROJECTION, 0), old)  # as a version before the limit did
    channel = await amqp.channel()
    with caplog.at_level(logging.WARNING, logger="workers.broker"):
        await declared(channel)
    warnings = [r for r in caplog.records if r.name == "workers.broker" and r.levelno == logging.WARNING]
    assert [getattr(r, "queues", None) for r in warnings] == [[names.partition_queue(PROJECTION, 0)]]
    assert not channel.is_closed
    await redeclare(amqp, names.partition_queue(PROJECTION, 0), old)  # its arguments are unchanged
    await redeclare(amqp, names.partition_queue(PROJECTION, 1), broker.partition_queue_arguments(names, PROJECTION))

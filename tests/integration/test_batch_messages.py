"""Batch messages: one partition's events in one message, decoded back exactly; poison stays with its event."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from store import NO_STREAM, EventStore, db
from store.partitions import partition_of
from store.records import Undecodable
from tests.conftest import PARTITIONS
from tests.unit.test_projection_fold import paid, placed, shipped
from workers import broker
from workers.errors import MalformedMessage
from workers.relay.publish import event_weight, partition_batches


async def stored_rows(pool: db.Pool) -> list[dict[str, Any]]:
    """The events as the relay's claim returns them (with their partition), in position order."""
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata,"
                            " recorded_at, transaction_id, partition FROM events ORDER BY global_position")
    return [dict(r) for r in rows]


def contents(messages: list[tuple[str, aio_pika.Message]]) -> list[tuple[str, list[tuple[str, int]]]]:
    """(routing key, [(stream, version) of each event]) of each message, in order."""
    return [(key, [(e.stream_id, e.version) for e in broker.from_batch_body(m.body).events]) for key, m in messages]


async def test_a_batch_decodes_to_the_events_as_loaded_from_the_store(pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), paid("order-1", "c")], NO_STREAM)
    await event_store.append("order-2", [placed("order-2", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    message = broker.batch_message(3, rows, [broker.event_map(r) for r in rows])
    decoded = broker.from_batch_body(message.body)
    loaded = [*await event_store.load("order-1"), *await event_store.load("order-2")]
    assert decoded == broker.Batch(sorted(loaded, key=lambda e: e.global_position))
    assert (message.type, message.delivery_mode, message.headers) == (
        broker.BATCH_TYPE, aio_pika.DeliveryMode.PERSISTENT,
        {"partition": 3, "count": 3, "first_position": rows[0]["global_position"],
         "last_position": rows[-1]["global_position"]})
    assert message.message_id == f"{rows[0]['event_id']}+3"


async def test_an_event_whose_metadata_is_corrupt_travels_flagged_and_comes_back_undecodable(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), paid("order-1", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    rows[1]["metadata"] = b"\xc1"  # never valid msgpack
    message = broker.batch_message(0, rows, [broker.event_map(r) for r in rows])
    batch = broker.from_batch_body(message.body)
    assert [type(e.event).__name__ for e in batch.events] == ["OrderPlaced", "Undecodable"]
    assert (batch.events[1].stream_id, batch.events[1].version) == ("order-1", 1)
    assert message.headers[broker.UNDECODABLE_HEADER] == 1


async def test_an_event_of_an_unknown_type_comes_back_undecodable_and_the_rest_decodes(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), paid("order-1", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    rows[0]["event_type"] = "Nobody.v9"
    batch = broker.from_batch_body(broker.batch_message(0, rows, [broker.event_map(r) for r in rows]).body)
    assert isinstance(batch.events[0].event, Undecodable)
    assert type(batch.events[1].event).__name__ == "OrderPaid"


def test_a_map_without_an_events_coordinates_is_dropped_and_counted() -> None:
    body = msgpack.packb([{"event_id": str(uuid.uuid4())}, {"stream_id": "order-1"}])
    assert broker.from_batch_body(body) == broker.Batch([], dropped=2)


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([1, 2]), b"x" * (3 * 2**20)])
def test_a_body_that_is_no_array_of_maps_is_malformed_whole(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        broker.from_batch_body(body)


def test_every_stream_has_one_queue_per_partition_name() -> None:
    names = broker.Names("app")
    assert (names.partitions_exchange, names.partition_queue("balances", 7)) == ("app.partitions",
                                                                                 "app.balances.7")
    assert partition_of("order-1", 16) == 9


async def test_partition_queues_are_single_active_consumer_quorum_queues_bound_by_number(
        amqp: AbstractRobustConnection, prefix: str, cleanup) -> None:
    names = broker.Names(prefix)
    channel = await amqp.channel()
    exchange = await broker.declare_partitions(channel, names, ["balances"], 4)

    async def undo() -> None:
        connection = await aio_pika.connect(amqp.url)  # type: ignore[attr-defined]
        async with connection:
            await broker.delete_partitions(await connection.channel(), names, ["balances"], 4)

    cleanup(undo)
    await exchange.publish(aio_pika.Message(b"2"), routing_key="2", mandatory=True)  # confirmed
    received: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for partition in range(4):  # basic.get is refused on single-active-consumer queues: consume them
        queue = await channel.declare_queue(names.partition_queue("balances", partition), passive=True)

        async def on_message(message: AbstractIncomingMessage, partition: int = partition) -> None:
            received.put_nowait((partition, message.body))

        await queue.consume(on_message, no_ack=True)
    assert await asyncio.wait_for(received.get(), 10) == (2, b"2")
    await asyncio.sleep(0.2)
    assert received.empty()
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):  # declared with the arguments above
        await (await amqp.channel()).declare_queue(names.partition_queue("balances", 0), durable=True,
                                                   arguments={"x-queue-type": "quorum"})


async def test_events_message_is_the_relays_batch_message_of_the_same_events(pool: db.Pool,
                                                                            event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), paid("order-1", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    relayed = broker.batch_message(1, rows, [broker.event_map(r) for r in rows])
    built = broker.events_message(1, await event_store.load("order-1"))
    assert (built.body, built.headers, built.message_id, built.type, built.delivery_mode) == (
        relayed.body, relayed.headers, relayed.message_id, relayed.type, relayed.delivery_mode)


async def test_the_relay_publishes_each_partitions_events_in_one_message_in_position_order(
        pool: db.Pool, event_store: EventStore) -> None:
    streams = [f"order-{i}" for i in range(12)]
    for sid in streams:  # appended one after the other: the partitions' events interleave in position order
        await event_store.append(sid, [placed(sid, "c")], NO_STREAM)
    for sid in streams:
        await event_store.append(sid, [paid(sid, "c")], 0)
    messages, undecodable = partition_batches(await stored_rows(pool), PARTITIONS)
    expected = {str(p): [(sid, v) for v in (0, 1) for sid in streams if partition_of(sid, PARTITIONS) == p]
                for p in range(PARTITIONS)}
    assert sorted(contents(messages)) == sorted((k, v) for k, v in expected.items() if v)
    assert undecodable == []


async def test_a_partitions_events_are_split_into_messages_of_at_most_message_events(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), *(paid("order-1", "c") for _ in range(6))],
                             NO_STREAM)
    messages, _ = partition_batches(await stored_rows(pool), PARTITIONS, message_events=3)
    key = str(partition_of("order-1", PARTITIONS))
    assert contents(messages) == [(key, [("order-1", v) for v in range(3)]),
                                  (key, [("order-1", v) for v in range(3, 6)]), (key, [("order-1", 6)])]


async def test_a_message_holds_the_events_that_fit_in_message_bytes_and_a_bigger_one_goes_alone(
        pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), paid("order-1", "c"), shipped("order-1", "c"),
                                         paid("order-1", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    weight = [event_weight(r) for r in rows]
    limit = weight[0] + weight[1]  # room for the first two events exactly
    rows[2]["data"] = rows[2]["data"] + b"\x00" * limit  # the third is bigger than a whole message
    messages, _ = partition_batches(rows, PARTITIONS, message_bytes=limit)
    assert [[e.version for e in broker.from_batch_body(m.body).events] for _, m in messages] == [[0, 1], [2], [3]]


async def test_a_message_of_events_with_the_longest_stream_ids_stays_within_message_bytes(
        pool: db.Pool, event_store: EventStore) -> None:
    streams = [f"{i:03d}" + "\u00e9" * 252 for i in range(60)]  # 255 characters, 507 bytes each
    await event_store.append_batch([(s, [paid(s, "c")], NO_STREAM) for s in streams])
    rows = await stored_rows(pool)

    messages, _ = partition_batches(rows, PARTITIONS, message_events=1000, message_bytes=8192)

    assert max(len(m.body) for _, m in messages) <= 8192 + 5  # the array's header
    assert sum(len(broker.from_batch_body(m.body).events) for _, m in messages) == len(streams)


async def test_a_row_written_before_partitions_goes_to_its_streams_partition(pool: db.Pool,
                                                                            event_store: EventStore) -> None:
    await event_store.append("order-2", [placed("order-2", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    rows[0]["partition"] = None  # as migrate leaves it until its fill reaches the row
    [(key, message)] = partition_batches(rows, PARTITIONS)[0]
    assert (key, message.headers["partition"]) == (str(partition_of("order-2", PARTITIONS)),
                                                    partition_of("order-2", PARTITIONS))


async def test_the_relay_returns_the_rows_it_flagged_undecodable(pool: db.Pool, event_store: EventStore) -> None:
    await event_store.append("order-1", [placed("order-1", "c"), paid("order-1", "c")], NO_STREAM)
    rows = await stored_rows(pool)
    rows[1]["metadata"] = b"\xc1"
    [(_, message)], undecodable = partition_batches(rows, PARTITIONS)
    assert [(row["version"], "corrupt msgpack" in reason) for row, reason in undecodable] == [(1, True)]
    assert message.headers[broker.UNDECODABLE_HEADER] == 1

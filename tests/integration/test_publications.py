"""Publications through real services: integration events on a queue bound to the exchange, in stream order,
with the events' ids; a raising mapping parked; republish from a position; status."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
import tenacity

from eventfleet.examples.orders.events import OrderPaid
from eventfleet.examples.orders.publications import OrdersOut
from projections import registry
from projections.base import handles
from projections.publication import Public, Publication, PublishUnavailable, envelope
from store import NO_STREAM, EventStore, RecordedEvent, db
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed, shipped
from workers import broker, errors, projector, relay
from workers.admin import status
from workers.config import Settings
from workers.projector import parking
from workers.publication import frames
from workers.publication.every_event import EveryEvent
from workers.publication.every_event_legacy import EveryEventLegacy
from workers.publication.outlet import AmqpOutlet, Runtime
from workers.publication.republish import republish
from workers.runtime import health

# Registered by their imports: only while this module's tests run.
registry.REGISTRY.pop(OrdersOut.name, None)
registry.REGISTRY.pop(EveryEventLegacy.name, None)
registry.REGISTRY.pop(EveryEvent.name, None)


class Fussy(Publication):
    """Publishes payments; its mapping fails on the payment of order 2."""

    name = "fussy_out"
    fixed = False  # the fix deployed: order 2's payment maps

    @handles(OrderPaid)
    def paid(self, event: RecordedEvent) -> Public:
        if event.stream_id == "order-2" and not self.fixed:
            raise ValueError("cannot map this payment")
        return Public("fussy.paid", 1, {"order": event.stream_id})


@pytest.fixture(autouse=True)
def publications() -> Iterator[None]:
    for cls in (OrdersOut, Fussy):
        registry.REGISTRY[cls.name] = cls
    yield
    for cls in (OrdersOut, Fussy):
        registry.REGISTRY.pop(cls.name, None)


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                    lease_seconds=3, catchup_threshold=1)


@pytest.fixture
async def inbox(prefix: str) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A consumer's queue bound to every public type of the deployment's integration exchange."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(broker.Names(prefix).integration_exchange,
                                              aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "#")
    yield queue
    await connection.close()


async def received(queue: aio_pika.abc.AbstractQueue, count: int, within: float = 60) -> list[Any]:
    """The next ``count`` messages of the queue (acked), in arrival order."""
    found: list[Any] = []
    deadline = time.monotonic() + within
    while len(found) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            assert time.monotonic() < deadline, f"{len(found)} of {count} messages"
            await asyncio.sleep(0.05)
            continue
        found.append(message)
    return found


async def nothing_more(queue: aio_pika.abc.AbstractQueue) -> bool:
    await asyncio.sleep(0.5)
    return await queue.get(no_ack=True, fail=False) is None


async def orders(event_store: EventStore, count: int) -> list[RecordedEvent]:
    """``count`` orders placed, paid and shipped; their events."""
    for i in range(count):
        await event_store.append(f"order-{i}", [placed(str(i), "c"), paid(str(i), "c"), shipped(str(i), "c")],
                                 NO_STREAM)
    return [e for i in range(count) for e in await event_store.load(f"order-{i}")]


async def running_worker(pool: db.Pool, settings: Settings, subscribers: list[Any], stop: asyncio.Event,
                         ) -> asyncio.Task[Any]:
    return asyncio.create_task(projector.run_worker(settings, subscribers, health.Health(), stop, pool=pool))


async def relay_all(pool: db.Pool, settings: Settings, projections: list[str]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        targets = await broker.declare_topology(channel, broker.Names(settings.prefix), projections, PARTITIONS)
        await relay.relay_until_idle(pool, targets)


async def test_a_worker_publishes_every_handled_event_in_stream_order_with_the_events_ids(
        pool, event_store, settings, inbox):
    stop = asyncio.Event()
    worker = await running_worker(pool, settings, [OrdersOut()], stop)
    try:
        events = await orders(event_store, 6)
        await relay_all(pool, settings, ["orders_out"])
        messages = await received(inbox, len(events))
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    by_stream: dict[str, list[tuple[int, str, str]]] = {}
    for m in messages:
        by_stream.setdefault(m.headers["ce-subject"], []).append(
            (int(m.headers["ce-streamversion"]), m.headers["ce-id"], m.routing_key))
    assert by_stream == {f"order-{i}": [
        (e.version, str(e.event_id), ("orders.placed.v1", "orders.paid.v1", "orders.shipped.v1")[e.version])
        for e in events if e.stream_id == f"order-{i}"] for i in range(6)}
    assert all(m.message_id == m.headers["ce-id"] and m.content_type == "application/json" for m in messages)
    assert json.loads(messages[0].body)["order_id"] == messages[0].headers["ce-subject"].removeprefix("order-")


async def test_a_mapping_that_raises_parks_its_event_and_halts_its_stream_only(event_store, settings, inbox):
    events = await orders(event_store, 4)
    fussy = Fussy()
    await fussy.attach(event_store, Runtime(settings))
    try:
        result = await parking.apply_or_park(event_store, fussy, events, wait=tenacity.wait_none())
    finally:
        await fussy.detach()
    assert [(p.event.stream_id, p.event.version, p.policy) for p in result.parked] == [("order-2", 1, "halt")]
    messages = await received(inbox, 3)
    assert sorted(m.headers["ce-subject"] for m in messages) == ["order-0", "order-1", "order-3"]
    assert await nothing_more(inbox)
    parked = await parking.list_parked(event_store.pool, "fussy_out")
    assert [(r["stream_id"], r["version"], r["error"].splitlines()[0]) for r in parked] == [
        ("order-2", 1, "ValueError: cannot map this payment")]


async def test_republish_moves_the_checkpoints_back_to_a_position_and_a_worker_publishes_from_there(
        pool, event_store, settings, inbox):
    events = await orders(event_store, 4)
    first = OrdersOut()
    await first.attach(event_store, Runtime(settings))
    try:
        await parking.apply_or_park(event_store, first, events)
    finally:
        await first.detach()
    assert len(await received(inbox, len(events))) == len(events)
    since = [e for e in events if e.version >= 1]  # the payments and shipments, from the first payment on
    start = min(e.global_position for e in since)
    done = await republish(event_store, "orders_out", start)
    assert (done.streams, done.events) == (4, len([e for e in events if e.global_position >= start]))
    stop = asyncio.Event()
    worker = await running_worker(pool, settings, [OrdersOut()], stop)
    try:
        again = await received(inbox, done.events)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    assert sorted((m.headers["ce-subject"], int(m.headers["ce-streamversion"]), m.headers["ce-id"]) for m in again) == (
        sorted((e.stream_id, e.version, str(e.event_id)) for e in events if e.global_position >= start))
    assert await nothing_more(inbox)


async def test_republish_refuses_a_read_model(event_store):
    with pytest.raises(errors.NotRetryable, match="customer_stats is a projection, not a publication"):
        await republish(event_store, "customer_stats", 0)


async def test_status_shows_a_publication_with_its_kind_and_exchange(pool, schema, prefix):
    report = await status.collect(pool, schema, prefix, None)
    row = next(p for p in report.projections if p.name == "orders_out")
    assert (row.kind, row.to_json()["kind"]) == ("publication", "publication")
    assert [p.to_json() for p in report.publications] == [
        {"name": "fussy_out", "exchange": f"{prefix}.integration", "format": "json"},
        {"name": "orders_out", "exchange": f"{prefix}.integration", "format": "json"}]


async def test_a_broker_that_takes_nothing_is_an_outage_retried_not_a_poison_event(event_store, settings):
    events = await orders(event_store, 2)
    unreachable = dataclasses.replace(settings, amqp_url="amqp://guest:guest@127.0.0.1:1/",
                                      amqp_urls=("amqp://guest:guest@127.0.0.1:1/",))
    out = OrdersOut()
    await out.attach(event_store, Runtime(unreachable))
    try:
        with pytest.raises(PublishUnavailable, match="orders_out"):
            await parking.apply_or_park(event_store, out, events, wait=tenacity.wait_none())
    finally:
        await out.detach()
    assert await event_store.pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await event_store.pool.fetchval("SELECT count(*) FROM checkpoints WHERE projection = 'orders_out'") == 0


async def test_every_event_legacy_publishes_the_per_event_exchange_messages_in_stream_order(event_store, settings,
                                                                                             prefix):
    events = await orders(event_store, 3)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await broker.declare_exchange(channel, broker.Names(prefix))  # {prefix}.events, as consumers do
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        legacy = EveryEventLegacy()
        await legacy.attach(event_store, Runtime(settings))
        try:
            await parking.apply_or_park(event_store, legacy, events)
        finally:
            await legacy.detach()
        messages = await received(queue, len(events))
    decoded = [broker.from_body(m.body, event_store.registry) for m in messages]
    assert sorted((e.stream_id, e.version, e.event_id) for e in decoded) == sorted(
        (e.stream_id, e.version, e.event_id) for e in events)
    assert [(m.routing_key, m.message_id, m.headers["event_type"]) for m in messages] == [
        (e.event_type, str(e.event_id), e.event_type) for e in decoded]
    for sid in {e.stream_id for e in events}:
        assert [e.version for e in decoded if e.stream_id == sid] == [0, 1, 2]


async def test_a_parked_event_retried_after_the_fix_is_published(event_store, settings, inbox):
    events = await orders(event_store, 3)
    fussy = Fussy()
    await fussy.attach(event_store, Runtime(settings))
    try:
        result = await parking.apply_or_park(event_store, fussy, events, wait=tenacity.wait_none())
    finally:
        await fussy.detach()
    assert len(await received(inbox, 2)) == 2  # orders 0 and 1
    fixed = Fussy()
    fixed.fixed = True
    done = await parking.retry(event_store, result.parked[0].dead_letter_id, lambda _: fixed,
                               runtime=Runtime(settings))
    await fixed.detach()
    (message,) = await received(inbox, 1)
    assert (done.stream_id, done.applied) == ("order-2", 2)  # the payment and the shipment held behind it
    assert (message.headers["ce-subject"], message.headers["ce-streamversion"], message.routing_key) == (
        "order-2", "1", "fussy.paid.v1")
    assert await nothing_more(inbox)


async def test_the_outlet_writes_a_batch_at_once_and_every_message_arrives_in_order_as_built(
        event_store, settings, inbox):
    events = await orders(event_store, 40)
    source = "/eventfleet/test/publications/t"
    sent = [envelope(Public("orders.any", 1, {"n": n}), e, source) for n, e in enumerate(events)]
    outlet = AmqpOutlet(settings.amqp_urls, broker.Names(settings.prefix).integration_exchange, "t")
    try:
        await outlet.publish(sent)
        assert frames.supported(await outlet._opened())  # the installed aiormq takes the batch path
    finally:
        await outlet.close()
    got = await received(inbox, len(sent))
    assert [(m.routing_key, m.message_id, m.headers, m.body, m.content_type, m.delivery_mode) for m in got] == [
        (m.routing_key, m.message_id, m.headers, m.body, m.content_type, aio_pika.DeliveryMode.PERSISTENT)
        for m in sent]


async def test_a_batch_the_broker_refuses_is_an_outage_and_the_outlet_publishes_the_next_on_a_new_channel(
        event_store, settings, inbox):
    events = await orders(event_store, 2)
    sent = [envelope(Public("orders.any", 1, {"n": n}), e, "/x") for n, e in enumerate(events)]
    outlet = AmqpOutlet(settings.amqp_urls, f"{settings.prefix}.gone", "t", confirm_seconds=10)
    try:
        await outlet._opened()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).exchange_delete(f"{settings.prefix}.gone")
        with pytest.raises(PublishUnavailable, match="NOT_FOUND"):
            await outlet.publish(sent)  # the broker closes the channel: no confirm
        await outlet.publish(sent)  # reconnected, the exchange declared again
    finally:
        await outlet.close()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).exchange_delete(f"{settings.prefix}.gone")

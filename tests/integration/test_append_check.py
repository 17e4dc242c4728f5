"""Misfitting events against the real store: refused with InvalidEvent before anything is written, so every
stored event decodes back; well-typed ones round-trip exactly through append, load and read_all."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders import orders
from eventfleet.examples.orders.events import OrderPaid
from store import NO_STREAM, EventStore, InvalidEvent, NewEvent, Repository, codec, db
from tests.unit.test_append_check import (
    HOSTILE,
    ITEM,
    KINDS,
    NOW,
    PAID,
    PLACED,
    Currency,
    Kinds,
    Priced,
    equal,
    kinds,
    replaced,
)
from tests.unit.test_codec import exact

MISFITS = [
    pytest.param(codec.REGISTRY, replaced(PAID, amount=1.5), "OrderPaid.amount: expected Decimal, got float",
                 id="float-in-decimal"),
    pytest.param(codec.REGISTRY, replaced(PAID, customer_id=None), "OrderPaid.customer_id: expected str, got NoneType",
                 id="none-in-str"),
    pytest.param(codec.REGISTRY, replaced(PAID, paid_at=NOW.replace(tzinfo=None)),
                 "OrderPaid.paid_at: expected timezone-aware datetime, got naive datetime", id="naive-datetime"),
    pytest.param(codec.REGISTRY, replaced(PLACED, items=(ITEM, replaced(ITEM, quantity=True))),
                 "OrderPlaced.items[1].quantity: expected int, got bool", id="bool-in-int-nested"),
    pytest.param(codec.REGISTRY, replaced(PLACED, items=[ITEM]),
                 "OrderPlaced.items: expected tuple[LineItem, ...], got list (it would be read back as tuple)",
                 id="list-in-tuple"),
    pytest.param(codec.REGISTRY, replaced(PLACED, items=(dataclasses.asdict(ITEM),)),
                 "OrderPlaced.items[0]: expected LineItem, got dict (it would be read back as LineItem)",
                 id="map-for-dataclass"),
    pytest.param(KINDS, kinds(ident=str(uuid.UUID(int=7))), "Kinds.ident: expected UUID, got str", id="str-in-uuid"),
    pytest.param(KINDS, kinds(maybe=1.5), "Kinds.maybe: expected Decimal | None, got float", id="float-in-optional"),
    pytest.param(KINDS, kinds(counts={1: 1}), "Kinds.counts key 1: expected str, got int", id="int-map-key"),
    pytest.param(KINDS, kinds(anything=(1, 2)), "Kinds.anything: expected Any, got tuple (it would be read back as list)",
                 id="tuple-in-any"),
    pytest.param(KINDS, kinds(number=2**64),
                 "Kinds.number: expected int, got int (outside msgpack's integers, -2**63 to 2**64-1)",
                 id="int-out-of-range"),
    pytest.param(KINDS, Priced(Currency.EUR), "Priced.currency: expected Currency, got Currency"
                 " (it would be read back as str)", id="enum-field"),
]


async def written(pool: db.Pool) -> tuple[int, int]:
    return (await pool.fetchval("SELECT count(*) FROM events"), await pool.fetchval("SELECT count(*) FROM outbox"))


@pytest.mark.parametrize(("registry", "event", "message"), MISFITS)
async def test_a_misfitting_event_is_refused_and_nothing_is_written(
        pool: db.Pool, schema: str, registry: codec.Registry, event: Any, message: str) -> None:
    store = EventStore(pool, schema=schema, registry=registry)
    with pytest.raises(InvalidEvent) as info:
        await store.append("s-1", [event], NO_STREAM)
    assert str(info.value) == message
    assert await store.stream_version("s-1") == NO_STREAM
    assert await written(pool) == (0, 0)


async def test_a_misfit_after_good_events_in_one_append_writes_none_of_them(
        event_store: EventStore, pool: db.Pool) -> None:
    await event_store.append("order-1", [PAID], NO_STREAM)
    with pytest.raises(InvalidEvent, match=r"^OrderPaid\.amount: expected Decimal, got float$"):
        await event_store.append("order-1", [PAID, PAID, replaced(PAID, amount=1.5)], 0)
    assert await event_store.stream_version("order-1") == 0
    assert await written(pool) == (1, 1)


async def test_a_misfit_in_one_stream_of_append_batch_writes_no_stream(event_store: EventStore, pool: db.Pool) -> None:
    with pytest.raises(InvalidEvent, match=r"^OrderPlaced\.items\[0\]\.unit_price: expected Decimal, got float$"):
        await event_store.append_batch([
            ("order-1", [PAID], NO_STREAM),
            ("order-2", [PLACED, replaced(PLACED, items=(replaced(ITEM, unit_price=1.5),))], NO_STREAM),
            ("order-3", [PAID], NO_STREAM),
        ])
    assert [await event_store.stream_version(s) for s in ("order-1", "order-2", "order-3")] == [NO_STREAM] * 3
    assert await written(pool) == (0, 0)


async def test_a_misfitting_payload_wrapped_in_a_new_event_is_refused(event_store: EventStore, pool: db.Pool) -> None:
    with pytest.raises(InvalidEvent, match=r"^OrderPaid\.amount: expected Decimal, got float$"):
        await event_store.append("order-1", [NewEvent(replaced(PAID, amount=1.5), uuid.uuid4(), {"by": "test"})],
                                 NO_STREAM)
    assert await written(pool) == (0, 0)


async def test_a_command_emitting_a_misfit_is_refused_by_the_repository_and_writes_nothing(
        event_store: EventStore, pool: db.Pool) -> None:
    repository = Repository(event_store, orders.Order)
    await repository.execute("order-1", orders.place("1", "c", [ITEM], at=NOW))

    def pay_in_floats(order: orders.Order) -> list[Any]:
        return [OrderPaid(order.order_id, order.customer_id, float(order.total), NOW)]  # type: ignore[arg-type]

    with pytest.raises(InvalidEvent, match=r"^OrderPaid\.amount: expected Decimal, got float$"):
        await repository.execute("order-1", pay_in_floats)
    assert await event_store.stream_version("order-1") == 0
    assert (await repository.load("order-1")).status == "placed"


async def test_a_well_typed_event_of_every_field_kind_round_trips_through_the_store(
        pool: db.Pool, schema: str) -> None:
    store = EventStore(pool, schema=schema, registry=KINDS)
    event = kinds(maybe=Decimal("-0.00"), either="two", members=frozenset({3, 1}), anything={"k": [1, None, b"x"]})
    await store.append("kinds-1", [event, Kinds()], NO_STREAM)
    loaded = [r.event for r in await store.load("kinds-1")]
    read = [r.event for r in await store.read_all()]
    for _ in range(200):  # read_all waits for every older transaction in the cluster (other sessions' too)
        if len(read) == 2:
            break
        await asyncio.sleep(0.05)
        read = [r.event for r in await store.read_all()]
    assert exact(loaded, [event, Kinds()])
    assert exact(read, [event, Kinds()])


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from([f.name for f in dataclasses.fields(Kinds)]), value=HOSTILE)
async def test_whatever_append_accepts_loads_back_equal_and_whatever_it_refuses_is_not_written(
        pool: db.Pool, schema: str, name: str, value: Any) -> None:
    store = EventStore(pool, schema=schema, registry=KINDS)
    stream_id = f"kinds-{uuid.uuid4()}"
    event = kinds(**{name: value})
    try:
        await store.append(stream_id, [event], NO_STREAM)
    except InvalidEvent:
        assert await store.stream_version(stream_id) == NO_STREAM
        return
    (recorded,) = await store.load(stream_id)
    assert equal(recorded.event, event)


@pytest.mark.parametrize("metadata", [{1: "x"}, {"nested": {2: "y"}}])
async def test_metadata_that_would_not_decode_is_refused_and_nothing_is_written(
        event_store: EventStore, pool: db.Pool, metadata: dict[Any, Any]) -> None:
    with pytest.raises(InvalidEvent) as info:
        await event_store.append("order-1", [NewEvent(PAID, uuid.uuid4(), metadata)], NO_STREAM)
    assert str(info.value) == ("metadata: expected a map msgpack can decode, got dict"
                               " (int is not allowed for map key when strict_map_key=True)")
    assert await written(pool) == (0, 0)

"""A publication's mapping and envelope: CloudEvents 1.0 in the binary mode of its RabbitMQ binding."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

import msgpack
import pytest
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.formats.json import JSONFormat

from eventfleet.examples.orders.publications import OrdersOut
from projections import registry
from projections.base import handles
from projections.publication import (
    Public,
    Publication,
    PublishUnavailable,
    attributes_of,
    checked,
    encode_data,
    envelope,
    source_of,
)
from store import errors
from store.records import Position, RecordedEvent
from tests.unit.test_projection_fold import paid, placed
from workers.admin.status import ProjectionStatus, PublicationStatus, Report
from workers.cli.status import render

# Importing the example registered orders_out in this process: unregistered at once, so that later tests' relays,
# workers and migrations do not run it.
registry.REGISTRY.pop(OrdersOut.name, None)

AT = dt.datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=dt.UTC)
EVENT_ID = uuid.UUID("0b6f0f44-5b1e-4a57-9d3c-3d1f1c1e2a01")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def recorded(payload: Any, version: int = 3, metadata: dict[str, Any] | None = None) -> RecordedEvent:
    return RecordedEvent(EVENT_ID, f"order-{payload.order_id}", version, 41, Position(7, 41),
                         f"{type(payload).__name__}.v1", payload, b"", metadata or {}, AT)


def test_the_envelope_carries_every_attribute_as_a_ce_header_and_the_data_as_the_body() -> None:
    event = recorded(paid("1", "c1", "12.50"), metadata={"correlation_id": "req-9", "causation_id": "cause-1",
                                                         "traceparent": TRACEPARENT})
    out = envelope(Public("orders.paid", 2, {"amount": Decimal("12.50")}), event, source_of("shop", "orders_out"))
    assert out.headers == {
        "ce-id": str(EVENT_ID), "ce-source": "/eventfleet/shop/publications/orders_out", "ce-specversion": "1.0",
        "ce-type": "orders.paid.v2", "ce-subject": "order-1", "ce-time": "2026-03-01T12:30:05.123456Z",
        "ce-streamversion": "3", "ce-position": "41", "ce-correlationid": "req-9", "ce-causationid": "cause-1",
        "ce-traceparent": TRACEPARENT}
    assert (out.content_type, json.loads(out.body)) == ("application/json", {"amount": "12.50"})
    assert (out.routing_key, out.message_id, out.type, out.correlation_id) == (
        "orders.paid.v2", str(EVENT_ID), "orders.paid.v2", "req-9")


def test_the_cloudevents_sdk_reads_the_message_back() -> None:
    out = envelope(Public("orders.paid", 1, {"amount": "1.00"}), recorded(paid("1", "c1")), "/x")
    event = rabbitmq.from_binary(rabbitmq.RabbitMQMessage(dict(out.headers), out.content_type, out.body),
                                 JSONFormat())
    assert (event.get_id(), event.get_type(), event.get_subject(), event.get_time(), event.get_data()) == (
        str(EVENT_ID), "orders.paid.v1", "order-1", AT, {"amount": "1.00"})


def test_the_id_is_the_event_id_whichever_time_it_is_published() -> None:
    event = recorded(paid("1", "c1"))
    first, again = (envelope(Public("orders.paid"), event, "/x") for _ in range(2))
    assert first.message_id == again.message_id == str(EVENT_ID)


def test_extra_headers_travel_beside_the_envelope_and_may_not_take_its_names() -> None:
    event = recorded(paid("1", "c1"))
    assert envelope(Public("t", 1, None, {"tenant": "acme"}), event, "/x").headers["tenant"] == "acme"
    with pytest.raises(errors.InvalidInput, match="ce-type"):
        envelope(Public("t", 1, None, {"ce-type": "forged"}), event, "/x")


def test_json_bodies_write_decimals_ids_and_times_as_strings() -> None:
    body = encode_data({"d": Decimal("1.10"), "u": EVENT_ID, "t": AT, "s": ("a",)}, "json")
    assert json.loads(body) == {"d": "1.10", "u": str(EVENT_ID), "t": AT.isoformat(), "s": ["a"]}


def test_a_msgpack_publication_says_so_in_its_content_type() -> None:
    out = envelope(Public("t", 1, {"n": 1}), recorded(paid("1", "c1")), "/x", "msgpack")
    assert (out.content_type, msgpack.unpackb(out.body)) == ("application/msgpack", {"n": 1})


def test_the_example_maps_an_order_placed_to_its_public_contract() -> None:
    public = OrdersOut().public(recorded(placed("7", "c2", quantity=2, total="20.00")))
    assert public == Public("orders.placed", 1, {
        "order_id": "7", "customer_id": "c2", "total": "20.00",
        "lines": [{"sku": "W-1", "quantity": 2, "unit_price": "20.00"}], "placed_at": placed("7", "c2").placed_at.isoformat()})


def test_a_publication_publishes_only_the_types_it_handles() -> None:
    assert OrdersOut.handled_names() == frozenset({"OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"})


def test_a_handler_returning_anything_but_a_public_message_fails() -> None:
    class Wrong(Publication):
        name = "wrong"

        @handles(type(paid("1", "c")))
        def paid(self, event: RecordedEvent) -> Any:
            return {"not": "a Public"}

    with pytest.raises(TypeError, match="returns a Public or None, not dict"):
        Wrong().public(recorded(paid("1", "c1")))


def test_a_publication_is_no_read_model_to_rebuild_and_declares_no_personal_columns() -> None:
    assert (OrdersOut.kind, OrdersOut.replayable, OrdersOut.tables) == ("publication", False, ())
    with pytest.raises(TypeError, match="cannot be forgotten"):
        class Personal(Publication):
            name = "personal"
            personal: ClassVar[Mapping[str, tuple[str, tuple[str, ...]]]] = {"t": ("subject", ("email",))}


def test_a_broker_failure_is_an_outage_not_the_events_fault() -> None:
    assert issubclass(PublishUnavailable, errors.TransientError)


def test_the_envelope_writes_exactly_the_headers_the_cloudevents_sdk_writes() -> None:
    event = recorded(paid("1", "c1"), metadata={"correlation_id": "req-9", "causation_id": "cause-1",
                                                "traceparent": TRACEPARENT, "tracestate": "k=v"})
    public = Public("orders.paid", 2, {"amount": "1.00"})
    out = envelope(public, event, "/eventfleet/shop/publications/p")
    sdk = checked(attributes_of(public, event, "/eventfleet/shop/publications/p"), out.body)
    assert (out.headers, out.content_type, out.body) == (sdk.headers, sdk.content_type, sdk.body)


def test_an_empty_public_type_is_refused() -> None:
    with pytest.raises(errors.InvalidInput, match="type must not be empty"):
        envelope(Public(""), recorded(paid("1", "c1")), "/x")


def test_status_prints_a_table_of_publications_with_their_exchange_and_format() -> None:
    report = Report([ProjectionStatus("orders_out", "live", 3, 0, 0.0, 0, None, kind="publication")], 0, 0.0,
                    publications=[PublicationStatus("orders_out", "shop.integration", "json")])
    text = render(report)
    assert "PUBLICATION  EXCHANGE          FORMAT\norders_out   shop.integration  json" in text


def test_a_public_type_longer_than_a_routing_key_takes_is_refused() -> None:
    with pytest.raises(errors.InvalidInput, match="at most 255 bytes, got 258"):
        envelope(Public("t" * 255), recorded(paid("1", "c1")), "/x")

"""A publication's batch of messages marshalled by hand is, byte for byte, what aiormq and pamqp write."""

from __future__ import annotations

import datetime as dt

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from projections.publication import Outgoing, Public, envelope, source_of
from tests.unit.test_projection_fold import paid
from tests.unit.test_publication import TRACEPARENT, recorded
from workers.publication import frames
from workers.publication.outlet import properties_of

EXCHANGE = "shop.integration"


def aiormq_bytes(channel: int, message: Outgoing, max_content: int) -> bytes:
    """What ``basic_publish`` queues for one message (aiormq 7.2, pamqp 4)."""
    body = message.body
    parts = [ContentBody(body[at:at + max_content]) for at in range(0, len(body), max_content)]
    return ChannelFrame.marshall(channel_number=channel, frames=[
        spec.Basic.Publish(exchange=EXCHANGE, routing_key=message.routing_key),
        ContentHeader(properties=properties_of(message), body_size=len(body)), *parts]).payload


def outgoing(**changes: object) -> Outgoing:
    event = recorded(paid("1", "c1", "12.50"), metadata={"correlation_id": "req-9", "traceparent": TRACEPARENT})
    message = envelope(Public("orders.paid", 2, {"amount": "12.50"}, {"x-tenant": "ünïcode"}), event,
                       source_of("shop", "orders_out"))
    return Outgoing(**{**{f: getattr(message, f) for f in Outgoing.__slots__}, **changes})


def test_a_message_is_marshalled_as_aiormq_marshals_it() -> None:
    message = outgoing()
    assert frames.marshal(3, EXCHANGE, message, 131064) == aiormq_bytes(3, message, 131064)


def test_a_body_larger_than_a_frame_is_split_as_aiormq_splits_it() -> None:
    message = outgoing(body=bytes(range(256)) * 40)
    assert frames.marshal(1, EXCHANGE, message, 4088) == aiormq_bytes(1, message, 4088)


def test_a_message_without_correlation_headers_or_body_is_marshalled_as_aiormq_marshals_it() -> None:
    message = outgoing(correlation_id=None, headers={}, body=b"", content_type=None,
                       timestamp=dt.datetime(2026, 3, 1, 12, 30, 5))  # naive: taken as UTC, as pamqp does
    assert frames.marshal(2, EXCHANGE, message, 131064) == aiormq_bytes(2, message, 131064)


def test_a_header_that_is_not_text_is_encoded_by_pamqp() -> None:
    message = outgoing(headers={"x-count": 3, "ce-id": "1"})
    assert frames.marshal(2, EXCHANGE, message, 131064) == aiormq_bytes(2, message, 131064)


def test_a_routing_key_longer_than_255_bytes_is_refused_before_anything_is_queued() -> None:
    with pytest.raises(ValueError, match="at most 255 bytes"):
        frames.marshal(1, EXCHANGE, outgoing(routing_key="k" * 256), 131064)


def test_a_header_key_longer_than_128_bytes_is_cut_as_pamqp_cuts_it() -> None:
    message = outgoing(headers={"x-" + "k" * 200: "v"})
    assert frames.marshal(2, EXCHANGE, message, 131064) == aiormq_bytes(2, message, 131064)

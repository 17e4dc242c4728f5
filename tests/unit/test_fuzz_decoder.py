"""Fuzzing of everything that decodes untrusted bytes: it raises its one typed error, never anything else.

``workers.broker.from_body`` (a delivery off the wire) raises only ``MalformedMessage``, which the
consumer dead-letters; ``store.codec`` (bytes from the events table) raises only ``CodecError``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced
from store import codec, errors
from store.event_store import Position, RecordedEvent
from workers import broker
from workers.errors import MalformedMessage

# FUZZ_EXAMPLES=20000 for a long run; the default keeps the suite quick.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

NOW = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
PAID = OrderPaid("o-1", "c-1", Decimal("12.50"), NOW)

# The event types a delivery may claim: registered, unknown, malformed, too new, old (upcast).
EVENT_TYPES = st.sampled_from(["OrderPaid.v1", "OrderPlaced.v2", "OrderPlaced.v1", "OrderPlaced.v9",
                               "Nope.v1", "OrderPaid", "OrderPaid.v", ".v1", "OrderPaid.v-1", "",
                               "OrderPaid.v\u00b2", "OrderPaid.v\u0661", "OrderPaid.v" + "9" * 5000])

# Any msgpack-encodable value, including the codec's ext types and raw ext codes.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64 - 1), st.floats(),
    st.text(max_size=20), st.binary(max_size=20), st.uuids(), st.decimals(allow_nan=True),
    st.datetimes(timezones=st.just(dt.UTC)), st.dates(),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _pack(value: Any) -> bytes:
    # Raw msgpack (no codec checks): ext types pass through, naive or foreign values are allowed.
    def default(v: Any) -> Any:
        try:
            return codec._default(v)
        except errors.CodecError:
            return repr(v)

    return msgpack.packb(value, default=default, use_bin_type=True, datetime=False)


def valid_fields(event: Any = PAID) -> dict[str, Any]:
    """The body fields of a well-formed message carrying ``event``."""
    event_type, data = codec.REGISTRY.encode(event)
    return {
        "event_id": str(uuid.uuid4()), "stream_id": "order-o-1", "version": 0, "global_position": 1,
        "transaction_id": 7, "event_type": event_type, "data": data, "metadata": {"k": "v"},
        "recorded_at": msgpack.Timestamp.from_datetime(NOW),
    }


def body_of(fields: dict[str, Any]) -> bytes:
    return _pack(fields)


def only_malformed(body: bytes) -> RecordedEvent | None:
    """Decode body; return the event or None if it was rejected with MalformedMessage (anything else fails)."""
    try:
        return broker.from_body(body)
    except MalformedMessage as exc:
        message = str(exc)
    assert message
    return None


# --- the message decoder -------------------------------------------------------------------------


def test_a_valid_body_decodes() -> None:
    event = broker.from_body(body_of(valid_fields()))
    assert (event.event, event.stream_id, event.version, event.position) == (PAID, "order-o-1", 0, Position(7, 1))
    assert event.recorded_at == NOW


def test_the_relay_encoding_round_trips() -> None:
    placed = OrderPlaced("o", "c", (LineItem("p", "n", "s", 2, Decimal("1.5")),), Decimal(3), Decimal(0),
                         Decimal(3), NOW)
    event_type, data = codec.REGISTRY.encode(placed)
    recorded = RecordedEvent(uuid.uuid4(), "order-o", 3, 10, Position(5, 10), event_type, placed, data,
                             {"a": 1}, NOW)
    assert broker.from_body(broker.to_message(recorded).body) == recorded


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_malformed(body: bytes) -> None:
    only_malformed(body)


@FUZZ
@given(VALUES)
def test_any_msgpack_value_raises_only_malformed(value: Any) -> None:
    only_malformed(_pack(value))


FIELDS = st.sampled_from(["event_id", "stream_id", "version", "global_position", "transaction_id",
                          "event_type", "data", "metadata", "recorded_at"])


@FUZZ
@given(st.dictionaries(FIELDS, VALUES, max_size=4), st.sets(FIELDS, max_size=3))
def test_wrong_field_types_and_missing_fields_raise_only_malformed(
        replaced: dict[str, Any], removed: set[str]) -> None:
    fields = valid_fields() | replaced
    for name in removed:
        fields.pop(name, None)
    event = only_malformed(body_of(fields))
    if event is not None:  # accepted: then every field had the right type
        assert isinstance(event.version, int)
        assert event.version >= 0
        assert isinstance(event.stream_id, str)


@FUZZ
@given(EVENT_TYPES, VALUES)
def test_any_event_type_with_any_data_raises_only_malformed(event_type: str, data: Any) -> None:
    fields = valid_fields() | {"event_type": event_type, "data": _pack(data)}
    only_malformed(body_of(fields))


@FUZZ
@given(EVENT_TYPES, st.dictionaries(st.sampled_from(["order_id", "customer_id", "amount", "paid_at", "total",
                                                     "placed_at", "items", "subtotal", "tax", "x"]),
                                    VALUES, max_size=8))
def test_event_data_with_wrong_fields_raises_only_malformed(event_type: str, data: dict[str, Any]) -> None:
    fields = valid_fields() | {"event_type": event_type, "data": _pack(data)}
    only_malformed(body_of(fields))


@pytest.mark.parametrize(("field", "value"), [
    ("version", -1), ("version", 2**63), ("version", 2**64 - 1), ("version", True), ("version", 1.0),
    ("version", "0"), ("global_position", 0), ("global_position", 2**63), ("transaction_id", -1),
    ("transaction_id", 2**64), ("stream_id", ""), ("stream_id", "a\x00b"), ("stream_id", "x" * 10_000),
    ("stream_id", 7), ("event_id", "not-a-uuid"), ("event_id", 12), ("data", "text"), ("metadata", [1]),
    ("recorded_at", "2024-01-01"), ("recorded_at", 0), ("event_type", "Unknown.v1"), ("event_type", 3),
    ("event_type", "OrderPaid.v2"),
])
def test_each_bad_field_is_named_malformed(field: str, value: Any) -> None:
    with pytest.raises(MalformedMessage):
        broker.from_body(body_of(valid_fields() | {field: value}))


def test_an_oversized_body_is_refused_before_decoding() -> None:
    fields = valid_fields() | {"metadata": {"pad": "x" * broker.MAX_MESSAGE_BYTES}}
    with pytest.raises(MalformedMessage, match="over the"):
        broker.from_body(body_of(fields))


def test_a_body_claiming_huge_lengths_is_refused_cheaply() -> None:
    # A map header announcing 2**32-1 entries, and a bin header announcing 4 GiB, with no data behind.
    for body in (b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\x91" * 100_000):
        with pytest.raises(MalformedMessage):
            broker.from_body(body)


def test_an_old_version_missing_the_field_its_upcaster_reads_is_malformed() -> None:
    data = _pack({"order_id": "o", "customer_id": "c", "placed_at": NOW})  # v1 without "total"
    with pytest.raises(MalformedMessage):
        broker.from_body(body_of(valid_fields() | {"event_type": "OrderPlaced.v1", "data": data}))


# --- the store's codec ---------------------------------------------------------------------------


def only_codec_error(event_type: str, data: bytes) -> None:
    with contextlib.suppress(errors.CodecError):
        codec.REGISTRY.decode(event_type, data)


@FUZZ
@given(st.binary(max_size=512))
def test_unpackb_of_random_bytes_raises_only_codec_errors(data: bytes) -> None:
    with contextlib.suppress(errors.CodecError):
        codec.unpackb(data)


@FUZZ
@given(st.integers(0, 127), st.binary(max_size=64))
def test_unpackb_of_any_ext_value_raises_only_codec_errors(code: int, payload: bytes) -> None:
    with contextlib.suppress(errors.CodecError):
        codec.unpackb(msgpack.packb(msgpack.ExtType(code, payload)))


@FUZZ
@given(st.lists(VALUES, min_size=5, max_size=5))
def test_unpackb_of_any_datetime_body_raises_only_codec_errors(parts: list[Any]) -> None:
    with contextlib.suppress(errors.CodecError):
        codec.unpackb(msgpack.packb(msgpack.ExtType(1, _pack(parts))))


@FUZZ
@given(EVENT_TYPES, st.binary(max_size=256))
def test_registry_decode_of_random_bytes_raises_only_codec_errors(event_type: str, data: bytes) -> None:
    only_codec_error(event_type, data)


@FUZZ
@given(EVENT_TYPES | st.text(max_size=30), VALUES)
def test_registry_decode_of_any_msgpack_raises_only_codec_errors(event_type: str, value: Any) -> None:
    only_codec_error(event_type, _pack(value))


def test_registry_decode_of_a_v1_its_upcaster_cannot_read_is_a_schema_mismatch() -> None:
    with pytest.raises(errors.EventSchemaMismatch):
        codec.REGISTRY.decode("OrderPlaced.v1", _pack({"order_id": "o", "customer_id": "c", "placed_at": NOW}))


@pytest.mark.parametrize("event_type", [None, 3, b"OrderPaid.v1", "OrderPaid.v\u00b2", "OrderPaid.v\u0661",
                                        "OrderPaid.v" + "1" * 5000])
def test_registry_decode_of_a_non_text_type_is_unknown(event_type: Any) -> None:
    with pytest.raises(errors.UnknownEventType):
        codec.REGISTRY.decode(event_type, codec.REGISTRY.encode(PAID)[1])


@FUZZ
@given(st.builds(OrderPaid, st.text(), st.text(), st.decimals(allow_nan=False, allow_infinity=False),
                 st.datetimes(timezones=st.timezones())))
def test_valid_events_round_trip_exactly(event: OrderPaid) -> None:
    event_type, data = codec.REGISTRY.encode(event)
    decoded = codec.REGISTRY.decode(event_type, data)
    assert decoded == event
    assert decoded.paid_at.utcoffset() == event.paid_at.utcoffset()

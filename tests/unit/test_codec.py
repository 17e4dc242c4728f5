"""The codec: exact msgpack round trips, typed event classes under Name.vN, chained upcasting, typed errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders.events import (
    LineItem,
    OrderCancelled,
    OrderPaid,
    OrderPlaced,
    OrderPlacedV1,
    OrderShipped,
)
from store import codec, errors


def exact(a: Any, b: Any) -> bool:
    """Equal, and also the same representation: Decimal exponent, time zone and fold, container types."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Decimal):
        return bool(a.as_tuple() == b.as_tuple())
    if isinstance(a, dt.datetime):
        return (a.replace(tzinfo=None) == b.replace(tzinfo=None) and a.utcoffset() == b.utcoffset()
                and a.fold == b.fold and getattr(a.tzinfo, "key", None) == getattr(b.tzinfo, "key", None))
    if dataclasses.is_dataclass(a):
        return all(exact(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(exact(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(exact(a[k], b[k]) for k in a)
    return bool(a == b)


REG = codec.Registry()


@REG.event("Everything", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Everything:
    """An event with every kind of field the codec supports."""

    text: str
    number: int
    ratio: float
    flag: bool
    blob: bytes
    amount: Decimal
    at: dt.datetime
    day: dt.date
    ident: uuid.UUID
    tags: tuple[str, ...]
    lines: tuple[LineItem, ...]
    extra: dict[str, int]
    maybe: Decimal | None = None


aware = st.datetimes(timezones=st.one_of(st.timezones(), st.just(dt.UTC),
                                         st.builds(lambda m: dt.timezone(dt.timedelta(minutes=m)),
                                                   st.integers(-23 * 60, 23 * 60))))
decimals = st.decimals(allow_nan=True, allow_infinity=True)
line_items = st.builds(LineItem, st.text(), st.text(), st.text(), st.integers(0, 10**6),
                       st.decimals(allow_nan=False, allow_infinity=False, places=2))
events = st.one_of(
    st.builds(Everything, st.text(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.booleans(), st.binary(), decimals, aware, st.dates(), st.uuids(),
              st.lists(st.text()).map(tuple), st.lists(line_items, max_size=3).map(tuple),
              st.dictionaries(st.text(), st.integers(-(2**63), 2**63 - 1)), st.none() | decimals),
    st.builds(OrderPlaced, st.text(), st.text(), st.lists(line_items, max_size=4).map(tuple), decimals,
              decimals, decimals, aware),
    st.builds(OrderPaid, st.text(), st.text(), decimals, aware),
    st.builds(OrderShipped, st.text(), st.text(), st.text(), aware),
    st.builds(OrderCancelled, st.text(), st.text(), st.text(), aware),
)


def registry_of(event: Any) -> codec.Registry:
    return REG if isinstance(event, Everything) else codec.REGISTRY


@settings(max_examples=200, deadline=None)
@given(events)
def test_any_event_round_trips_exactly(event: Any) -> None:
    registry = registry_of(event)
    event_type, data = registry.encode(event)
    assert exact(registry.decode(event_type, data), event)


@pytest.mark.parametrize("value", [
    Decimal("1.50"), Decimal("-0"), Decimal("1E+3"), Decimal("NaN"), Decimal("-Infinity"), Decimal("sNaN"),
    Decimal("0.000000000000000000000000000001"), Decimal(2) ** 200,
    dt.datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
    dt.datetime(2024, 3, 31, 2, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Amsterdam")),
    dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
    uuid.UUID(int=0), uuid.uuid4(), dt.date(2024, 2, 29),
])
def test_ext_values_round_trip_exactly(value: Any) -> None:
    with decimal.localcontext() as ctx:
        ctx.traps[decimal.InvalidOperation] = False  # sNaN must survive, not signal
        assert exact(codec.unpackb(codec.packb({"v": value}))["v"], value)


@pytest.mark.parametrize("offset", [dt.timedelta(hours=5, minutes=30, seconds=7, microseconds=1),
                                    dt.timedelta(hours=-23, minutes=-59, seconds=-59, microseconds=-999999),
                                    dt.timedelta(microseconds=-1)])
def test_fixed_offsets_round_trip_to_the_microsecond(offset: dt.timedelta) -> None:
    value = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.timezone(offset))
    assert codec.unpackb(codec.packb(value)).utcoffset() == offset


def test_a_zone_read_from_a_file_keeps_its_offset() -> None:
    with open("/usr/share/zoneinfo/Europe/Paris", "rb") as f:
        keyless = zoneinfo.ZoneInfo.from_file(f)
    value = dt.datetime(2024, 7, 1, 12, 0, tzinfo=keyless)
    decoded = codec.unpackb(codec.packb(value))
    assert (decoded, decoded.utcoffset()) == (value, dt.timedelta(hours=2))


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(errors.CodecError, match="timezone-aware"):
        codec.packb(dt.datetime(2024, 1, 1))


def test_event_type_is_derived_from_the_registration() -> None:
    now = dt.datetime.now(dt.UTC)
    assert codec.REGISTRY.type_name(OrderPaid("o", "c", Decimal(1), now)) == "OrderPaid.v1"
    assert codec.REGISTRY.type_name(OrderPlacedV1("o", "c", Decimal(1), now)) == "OrderPlaced.v1"
    assert codec.REGISTRY.current_type_name("OrderPlaced") == "OrderPlaced.v2"
    with pytest.raises(errors.UnknownEventType):
        codec.REGISTRY.type_name(object())


def test_only_frozen_dataclasses_register_once_per_version() -> None:
    reg = codec.Registry()
    with pytest.raises(TypeError):
        reg.event("Mutable")(dataclasses.dataclass(type("Mutable", (), {"__annotations__": {"x": int}})))

    @reg.event("Thing", version=1)
    @dataclasses.dataclass(frozen=True)
    class Thing:
        x: int

    with pytest.raises(ValueError, match="already registered"):
        reg.event("Thing", version=1)(dataclasses.dataclass(frozen=True)(type("Other", (), {"__annotations__": {}})))


def test_upcasters_chain_from_any_old_version_to_the_current_one() -> None:
    reg = codec.Registry()

    @reg.event("Renamed", version=1)
    @dataclasses.dataclass(frozen=True)
    class V1:
        name: str

    @reg.event("Renamed", version=2)
    @dataclasses.dataclass(frozen=True)
    class V2:
        full_name: str

    @reg.event("Renamed", version=3)
    @dataclasses.dataclass(frozen=True)
    class V3:
        full_name: str
        nickname: str | None

    reg.upcaster("Renamed", from_version=1)(lambda f: {"full_name": f["name"]})
    reg.upcaster("Renamed", from_version=2)(lambda f: {**f, "nickname": None})
    for old in (V1("Ada Lovelace"), V2("Ada Lovelace")):
        event_type, data = reg.encode(old)
        assert reg.decode(event_type, data) == V3("Ada Lovelace", None)


def test_order_placed_v1_upcasts_to_v2() -> None:
    at = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    event_type, data = codec.REGISTRY.encode(OrderPlacedV1("o1", "c1", Decimal("12.50"), at))
    assert event_type == "OrderPlaced.v1"
    assert codec.REGISTRY.decode(event_type, data) == OrderPlaced(
        "o1", "c1", (), Decimal("12.50"), Decimal(0), Decimal("12.50"), at)


@pytest.mark.parametrize(("event_type", "data", "error"), [
    ("Unknown.v1", codec.packb({}), errors.UnknownEventType),
    ("OrderPaid.v2", codec.packb({}), errors.UnknownEventType),  # newer than this code
    ("OrderPaid", codec.packb({}), errors.UnknownEventType),
    ("OrderPaid.v1", b"\x92\x01", errors.CorruptEvent),  # truncated
    ("OrderPaid.v1", codec.packb([1, 2]), errors.CorruptEvent),  # not a map
    ("OrderPaid.v1", codec.packb({"order_id": "o"}), errors.EventSchemaMismatch),  # missing fields
    ("OrderPaid.v1", codec.packb({"order_id": "o", "customer_id": "c", "amount": 1.5,
                                  "paid_at": dt.datetime.now(dt.UTC)}), errors.EventSchemaMismatch),  # float money
    ("OrderPaid.v1", codec.packb({"order_id": "o", "customer_id": "c", "amount": Decimal(1),
                                  "paid_at": dt.datetime.now(dt.UTC), "x": 1}), errors.EventSchemaMismatch),
])
def test_undecodable_data_raises_typed_codec_errors(event_type: str, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        codec.REGISTRY.decode(event_type, data)
    assert issubclass(error, errors.CodecError)

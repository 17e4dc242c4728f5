"""The decoder's fast paths give exactly what the general ones give: compiled builders, slot-filling
constructors, cached zones, days and decimals, remembered event types."""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventfleet.examples.orders.events import LineItem, OrderCancelled, OrderPaid, OrderPlaced
from store import codec, errors
from tests.unit.test_fuzz_decoder import FUZZ, VALUES

NOW = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
ITEM = LineItem("p", "name", "sku", 2, Decimal("1.50"))
EXAMPLES = [OrderPlaced("o", "c", (ITEM, ITEM), Decimal(3), Decimal(0), Decimal(3), NOW),
            OrderPaid("o", "c", Decimal("3.00"), NOW), OrderCancelled("o", "c", "why", NOW), ITEM]


@dataclasses.dataclass(frozen=True, slots=True)
class WithDefaults:
    name: str
    ratio: float = 1.0
    note: str | None = None


def general(cls: type[Any], values: dict[str, Any]) -> Any:
    """The general path, which the compiled builder must equal on every map."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, f"{cls.__name__}.{f.name}", codec._converter(hints[f.name]))
              for f in dataclasses.fields(cls) if f.init]
    return codec._build_general(cls, fields, frozenset(n for n, _, _ in fields), values)


def outcome(build: Any, cls: type[Any], values: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return ("built", build(cls, values))
    except errors.CodecError as exc:
        return ("refused", type(exc), str(exc))


def fields_of(event: Any) -> dict[str, Any]:
    return dict(codec.unpackb(codec.packb(event)))


@FUZZ
@given(st.sampled_from([*EXAMPLES, WithDefaults("n", 0.5, "x")]),
       st.dictionaries(st.sampled_from(["order_id", "customer_id", "items", "total", "amount", "placed_at",
                                        "quantity", "unit_price", "name", "ratio", "note", "extra"]),
                       VALUES | st.just(ITEM) | st.just([fields_of(ITEM)]), max_size=3),
       st.sets(st.sampled_from(["order_id", "items", "amount", "quantity", "ratio", "note"]), max_size=2))
def test_the_compiled_builder_equals_the_general_path_on_any_map(event: Any, replaced: dict[str, Any],
                                                                 removed: set[str]) -> None:
    values = fields_of(event) | replaced
    for name in removed:
        values.pop(name, None)
    assert outcome(codec.build, type(event), values) == outcome(general, type(event), values)


@pytest.mark.parametrize("event", EXAMPLES)
def test_a_well_formed_map_builds_the_event_it_came_from(event: Any) -> None:
    assert codec.build(type(event), fields_of(event)) == event


def test_a_value_of_another_class_than_the_fields_own_goes_through_its_converter() -> None:
    with pytest.raises(errors.EventSchemaMismatch, match=r"LineItem\.quantity: expected int, got bool"):
        codec.build(LineItem, fields_of(ITEM) | {"quantity": True})
    built = codec.build(WithDefaults, {"name": "n", "ratio": 2, "note": None})
    assert (built.ratio, type(built.ratio)) == (2.0, float)


def test_a_frozen_slots_dataclass_is_constructed_by_filling_its_slots() -> None:
    make = codec.constructor(LineItem)

    item = make("p", "name", "sku", 2, Decimal("1.50"))

    assert make is not LineItem
    assert item == ITEM
    assert type(item) is LineItem
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.quantity = 3  # type: ignore[misc]


@dataclasses.dataclass(frozen=True, slots=True)
class Trimmed:
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip())


@dataclasses.dataclass(frozen=True)
class WithoutSlots:
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class WithInitVar:
    name: str
    prefix: dataclasses.InitVar[str]


@dataclasses.dataclass(frozen=True, slots=True)
class HandWritten:
    name: str

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name.upper())


@dataclasses.dataclass(slots=True)
class Mutable:
    name: str


@pytest.mark.parametrize("cls", [Trimmed, WithoutSlots, WithInitVar, HandWritten, Mutable])
def test_a_class_whose_init_may_do_more_is_constructed_by_its_init(cls: type[Any]) -> None:
    assert codec.constructor(cls) is cls


def test_decoding_runs_a_post_init_and_a_hand_written_init() -> None:
    assert codec.build(Trimmed, {"name": " a "}).name == "a"
    assert codec.build(HandWritten, {"name": "a"}).name == "A"


def _datetime_body(ordinal: Any, zone: Any) -> bytes:
    return msgpack.packb({"at": msgpack.ExtType(1, msgpack.packb([ordinal, 0, 0, 0, zone]))})


@pytest.mark.parametrize(("ordinal", "zone"), [(1.0, "UTC"), (True, "UTC"), (1, [1])])
def test_a_malformed_datetime_is_refused_whatever_was_decoded_before(ordinal: Any, zone: Any) -> None:
    with pytest.raises(errors.CorruptEvent):
        codec.unpackb(_datetime_body(ordinal, zone))
    assert codec.unpackb(_datetime_body(1, "UTC"))["at"] == dt.datetime(1, 1, 1, tzinfo=dt.UTC)  # now cached

    with pytest.raises(errors.CorruptEvent):
        codec.unpackb(_datetime_body(ordinal, zone))


def test_a_version_registered_after_decoding_changes_what_older_types_decode_to() -> None:
    reg = codec.Registry()

    @reg.event("Renamed", version=1)
    @dataclasses.dataclass(frozen=True, slots=True)
    class V1:
        name: str

    event_type, data = reg.encode(V1("a"))
    assert reg.decode(event_type, data) == V1("a")

    @reg.event("Renamed", version=2)
    @dataclasses.dataclass(frozen=True, slots=True)
    class V2:
        full_name: str

    with pytest.raises(errors.UnknownEventType, match="no upcaster"):
        reg.decode(event_type, data)
    reg.upcaster("Renamed", from_version=1)(lambda f: {"full_name": f["name"]})
    assert reg.decode(event_type, data) == V2("a")

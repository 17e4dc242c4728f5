"""The check at append (``Registry.encode_checked``): an event is encoded only if decoding it gives back an
equal event, and a misfit is an ``InvalidEvent`` naming the field, the type it expects and the value's."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import typing
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced
from store import codec, errors
from tests.unit.test_codec import events as well_typed_events
from tests.unit.test_codec import exact, registry_of
from tests.unit.test_fuzz_decoder import FUZZ, VALUES

T = TypeVar("T")
NOW = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
ITEM = LineItem("p", "name", "sku", 2, Decimal("1.50"))
PAID = OrderPaid("o", "c", Decimal("3.00"), NOW)
PLACED = OrderPlaced("o", "c", (ITEM, ITEM), Decimal(3), Decimal(0), Decimal(3), NOW)


IDENT = uuid.UUID(int=7)


class Currency(enum.StrEnum):
    EUR = "EUR"


KINDS = codec.Registry()


@KINDS.event("Kinds", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Kinds:
    """One field of every kind the decoder supports, each with a well-typed default."""

    text: str = "t"
    number: int = 1
    ratio: float = 0.5
    flag: bool = False
    blob: bytes = b"b"
    amount: Decimal = Decimal("1.25")
    at: dt.datetime = NOW
    day: dt.date = dt.date(2024, 2, 29)
    ident: uuid.UUID = IDENT
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    tags: tuple[str, ...] = ("x",)
    pair: tuple[int, str] = (1, "one")
    lines: tuple[LineItem, ...] = (ITEM,)
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: {"a": 1})
    maybe: Decimal | None = None
    either: int | str = 0
    members: frozenset[int] = frozenset({1})
    anything: Any = None


@KINDS.event("Keyed", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Keyed:
    by_number: dict[int, str]


@KINDS.event("Priced", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Priced:
    currency: Currency


@KINDS.event("Shouted", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Shouted:
    """Its __post_init__ is not idempotent: decoding it gives back another event."""

    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.text + "!")


@KINDS.event("Counted", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Counted:
    """A field outside __init__: encoded with the others, refused by the decoder as unknown."""

    text: str
    length: int = dataclasses.field(init=False, default=0)


def replaced(event: T, **fields: Any) -> T:
    """The event with other values in some fields, whatever their types (the point of these tests)."""
    return dataclasses.replace(event, **fields)  # type: ignore[type-var]


def kinds(**fields: Any) -> Kinds:
    return replaced(Kinds(), **fields)


def refusal(registry: codec.Registry, event: Any) -> str:
    with pytest.raises(errors.InvalidEvent) as info:
        registry.encode_checked(event)
    return str(info.value)


def round_trip(registry: codec.Registry, event: Any) -> Any:
    return registry.decode(*registry.encode_checked(event))


@pytest.mark.parametrize(("event", "message"), [
    (replaced(PAID, amount=1.5), "OrderPaid.amount: expected Decimal, got float"),
    (replaced(PAID, amount="1.50"), "OrderPaid.amount: expected Decimal, got str"),
    (replaced(PAID, amount=2), "OrderPaid.amount: expected Decimal, got int"),
    (replaced(PAID, customer_id=None), "OrderPaid.customer_id: expected str, got NoneType"),
    (replaced(PAID, order_id=12), "OrderPaid.order_id: expected str, got int"),
    (replaced(PAID, order_id=b"o"), "OrderPaid.order_id: expected str, got bytes"),
    (replaced(PAID, paid_at=NOW.isoformat()),
     "OrderPaid.paid_at: expected timezone-aware datetime, got str"),
    (replaced(PAID, paid_at=NOW.date()), "OrderPaid.paid_at: expected timezone-aware datetime, got date"),
])
def test_a_misfitting_field_is_refused_naming_the_class_the_field_the_expected_and_the_given_type(
        event: Any, message: str) -> None:
    assert refusal(codec.REGISTRY, event) == message


def test_a_naive_datetime_is_refused_as_a_misfit_of_its_field() -> None:
    assert (refusal(codec.REGISTRY, replaced(PAID, paid_at=dt.datetime(2024, 1, 1)))
            == "OrderPaid.paid_at: expected timezone-aware datetime, got naive datetime")


@pytest.mark.parametrize(("fields", "message"), [
    ({"number": True}, "Kinds.number: expected int, got bool"),
    ({"number": 1.0}, "Kinds.number: expected int, got float"),
    ({"flag": 1}, "Kinds.flag: expected bool, got int"),
    ({"ratio": True}, "Kinds.ratio: expected float, got bool"),
    ({"ident": str(uuid.UUID(int=7))}, "Kinds.ident: expected UUID, got str"),
    ({"day": NOW}, "Kinds.day: expected date, got datetime"),
    ({"maybe": 1.5}, "Kinds.maybe: expected Decimal | None, got float"),
    ({"either": 1.5}, "Kinds.either: expected int | str, got float"),
    ({"blob": "b"}, "Kinds.blob: expected bytes, got str"),
])
def test_the_decoders_rules_for_ints_bools_uuids_dates_and_unions_hold_at_append(
        fields: dict[str, Any], message: str) -> None:
    assert refusal(KINDS, kinds(**fields)) == message


@pytest.mark.parametrize(("event", "message"), [
    (replaced(PLACED, items=(ITEM, replaced(ITEM, quantity=True))),
     "OrderPlaced.items[1].quantity: expected int, got bool"),
    (replaced(PLACED, items=(replaced(ITEM, unit_price=1.5),)),
     "OrderPlaced.items[0].unit_price: expected Decimal, got float"),
    (replaced(PLACED, items=(ITEM, None)), "OrderPlaced.items[1]: expected LineItem, got NoneType"),
])
def test_a_misfit_inside_a_nested_dataclass_is_named_by_its_path(event: Any, message: str) -> None:
    assert refusal(codec.REGISTRY, event) == message


@pytest.mark.parametrize(("registry", "event", "message"), [
    (codec.REGISTRY, replaced(PLACED, items=[ITEM]),
     "OrderPlaced.items: expected tuple[LineItem, ...], got list (it would be read back as tuple)"),
    (codec.REGISTRY, replaced(PLACED, items=(dataclasses.asdict(ITEM),)),
     "OrderPlaced.items[0]: expected LineItem, got dict (it would be read back as LineItem)"),
    (KINDS, kinds(names=("a",)), "Kinds.names: expected list[str], got tuple (it would be read back as list)"),
    (KINDS, kinds(pair=[1, "one"]), "Kinds.pair: expected tuple[int, str], got list (it would be read back as tuple)"),
    (KINDS, kinds(pair=(1,)), "Kinds.pair: expected tuple[int, str], got tuple of 1 item"),
    (KINDS, kinds(pair=(1, 2)), "Kinds.pair[1]: expected str, got int"),
    (KINDS, kinds(anything=(1, 2)), "Kinds.anything: expected Any, got tuple (it would be read back as list)"),
    (KINDS, kinds(anything=[ITEM]), "Kinds.anything[0]: expected Any, got LineItem (it would be read back as dict)"),
])
def test_a_value_that_would_be_read_back_as_another_class_is_refused(
        registry: codec.Registry, event: Any, message: str) -> None:
    assert refusal(registry, event) == message


def test_a_map_key_msgpack_would_not_decode_is_refused() -> None:
    assert refusal(KINDS, kinds(counts={1: 1})) == "Kinds.counts key 1: expected str, got int"
    assert refusal(KINDS, Keyed({1: "one"})) == (
        "Keyed.by_number: expected dict[int, str], got dict"
        " (it would not decode: int is not allowed for map key when strict_map_key=True)")


def test_a_map_value_that_misfits_is_named_by_its_key() -> None:
    assert refusal(KINDS, kinds(counts={"a": "1"})) == "Kinds.counts['a']: expected int, got str"


@pytest.mark.parametrize(("fields", "message"), [
    ({"number": 2**64}, "Kinds.number: expected int, got int (outside msgpack's integers, -2**63 to 2**64-1)"),
    ({"number": -(2**63) - 1},
     "Kinds.number: expected int, got int (outside msgpack's integers, -2**63 to 2**64-1)"),
    ({"text": "\ud800"}, ("Kinds.text: expected str, got str (cannot encode: 'utf-8' codec can't encode character"
                          " '\\ud800' in position 0: surrogates not allowed)")),
    ({"anything": object()}, "Kinds.anything: expected Any, got object (cannot encode a value of type object)"),
    ({"anything": [dt.datetime(2024, 1, 1)]}, "Kinds.anything[0]: expected Any, got naive datetime"),
    ({"members": frozenset({1, (1,)})}, ("Kinds.members: expected frozenset[int], got frozenset"
                                        " (cannot encode: '<' not supported between instances of 'tuple' and 'int')")),
])
def test_a_value_msgpack_cannot_encode_is_refused_as_a_misfit_of_its_field(
        fields: dict[str, Any], message: str) -> None:
    assert refusal(KINDS, kinds(**fields)) == message


def test_a_zone_the_decoder_cannot_find_is_refused() -> None:
    with open("/usr/share/zoneinfo/Europe/Paris", "rb") as f:
        misnamed = zoneinfo.ZoneInfo.from_file(f, key="Nowhere/Atlantis")
    assert refusal(KINDS, kinds(at=NOW.astimezone(misnamed))) == (
        "Kinds.at: expected timezone-aware datetime, got datetime"
        " (it would not decode: 'No time zone found with key Nowhere/Atlantis')")


def test_an_enum_field_is_refused_because_msgpack_gives_it_back_as_text() -> None:
    assert refusal(KINDS, Priced(Currency.EUR)) == (
        "Priced.currency: expected Currency, got Currency (it would be read back as str)")


def test_a_class_whose_post_init_changes_decoded_fields_is_refused() -> None:
    assert refusal(KINDS, Shouted("hi")) == "Shouted: expected Shouted, got Shouted (it would be read back as a different value)"


def test_a_class_with_a_field_outside_init_is_refused_as_the_decoder_refuses_it() -> None:
    assert refusal(KINDS, Counted("hi")) == (
        "Counted: expected Counted, got Counted (the decoder says: Counted has no fields ['length'])")


def test_an_old_version_that_its_upcaster_cannot_read_is_refused() -> None:
    registry = codec.Registry()

    @registry.event("Priced", version=1)
    @dataclasses.dataclass(frozen=True, slots=True)
    class PricedV1:
        price: str

    @registry.event("Priced", version=2)
    @dataclasses.dataclass(frozen=True, slots=True)
    class PricedV2:
        price: Decimal

    registry.upcaster("Priced", from_version=1)(lambda f: {"price": Decimal(f["price"])})
    assert round_trip(registry, PricedV1("1.50")) == PricedV2(Decimal("1.50"))
    assert refusal(registry, PricedV1("one fifty")) == (
        "Priced.v1 would not upcast to v2: upcasting Priced.v1 failed:"
        " InvalidOperation: [<class 'decimal.ConversionSyntax'>]")


def test_the_refusal_is_an_invalid_input_and_a_schema_mismatch() -> None:
    with pytest.raises(errors.InvalidEvent) as info:
        codec.REGISTRY.encode_checked(replaced(PAID, amount=1.5))
    assert isinstance(info.value, errors.InvalidInput)
    assert isinstance(info.value, errors.EventSchemaMismatch)


@pytest.mark.parametrize(("fields", "decoded"), [
    ({"ratio": 3}, {"ratio": 3.0}),  # an int in a float field is read back as that float
    ({"text": Currency.EUR}, {"text": "EUR"}),  # a str subclass is read back as the text it equals
    ({"blob": bytearray(b"b")}, {"blob": b"b"}),
    ({"members": {1, 2}}, {"members": frozenset({1, 2})}),
    ({"at": NOW.astimezone(dt.timezone(dt.timedelta(hours=5, seconds=7), "X"))},
     {"at": NOW.astimezone(dt.timezone(dt.timedelta(hours=5, seconds=7)))}),
])
def test_a_value_the_decoder_converts_to_an_equal_one_is_accepted(
        fields: dict[str, Any], decoded: dict[str, Any]) -> None:
    back = round_trip(KINDS, kinds(**fields))
    assert back == kinds(**fields)
    assert exact(back, kinds(**decoded))


@pytest.mark.parametrize("amount", [Decimal("NaN"), Decimal("-sNaN12"), Decimal("-0"), Decimal("1E+3")])
def test_decimals_that_are_unequal_to_themselves_or_unusual_are_accepted_exactly(amount: Decimal) -> None:
    with decimal.localcontext() as ctx:
        ctx.traps[decimal.InvalidOperation] = False
        assert exact(round_trip(codec.REGISTRY, replaced(PAID, amount=amount)),
                     replaced(PAID, amount=amount))


def test_a_signalling_nan_is_accepted_under_the_default_context() -> None:
    event = replaced(PAID, amount=Decimal("sNaN"))
    event_type, data = codec.REGISTRY.encode_checked(event)
    assert (event_type, data) == codec.REGISTRY.encode(event)


kinds_events = st.builds(
    Kinds, st.text(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.booleans(), st.binary(),
    st.decimals(allow_nan=False), st.datetimes(timezones=st.timezones()), st.dates(), st.uuids(),
    st.lists(st.text()), st.lists(st.text()).map(tuple), st.tuples(st.integers(-10, 10), st.text()),
    st.lists(st.builds(LineItem, st.text(), st.text(), st.text(), st.integers(0, 10), st.decimals(places=2)),
             max_size=3).map(tuple),
    st.dictionaries(st.text(), st.integers(-(2**63), 2**63 - 1)), st.none() | st.decimals(allow_nan=False),
    st.integers(-5, 5) | st.text(), st.frozensets(st.integers(-5, 5)),
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.lists(st.integers(-3, 3)))


@FUZZ
@given(well_typed_events | kinds_events)
def test_a_well_typed_event_of_every_field_kind_is_accepted_and_decodes_back_exactly(event: Any) -> None:
    registry = KINDS if isinstance(event, Kinds) else registry_of(event)
    assert exact(round_trip(registry, event), event)


# Misfits of every kind, for any field: the check must accept exactly what the decoder gives back equal.
HOSTILE = st.one_of(
    VALUES, st.lists(VALUES, max_size=3).map(tuple), st.frozensets(st.integers(-3, 3) | st.text(max_size=2)),
    st.datetimes(), st.datetimes(timezones=st.timezones()), st.just(ITEM), st.just(dataclasses.asdict(ITEM)),
    st.builds(LineItem, st.text(max_size=3), st.text(max_size=3), VALUES, VALUES, VALUES),
    st.lists(st.builds(LineItem, st.text(max_size=3), st.text(max_size=3), st.text(max_size=3),
                       st.integers(0, 3) | st.booleans(), st.decimals(places=2) | st.floats()), max_size=2).map(tuple),
    st.dictionaries(st.integers(-3, 3) | st.text(max_size=2), st.integers(-3, 3), max_size=2),
    st.sampled_from([Currency.EUR, bytearray(b"x"), 2**64, -(2**63) - 1, 2**53 + 1, "\ud800", object()]),
)


def equal(a: Any, b: Any) -> bool:
    """a == b, or the same repr: a NaN is unequal to itself, and a signalling one raises when compared."""
    try:
        if a == b:
            return True
    except decimal.InvalidOperation:
        pass
    return repr(a) == repr(b)


def decodes_back_equal(event: Any) -> bool:
    """The decoder's own answer: encode unchecked, decode as the event's class, compare."""
    try:
        _, data = KINDS.encode(event)
        back = codec.build(type(event), codec.unpackb(data))
    except errors.CodecError:
        return False
    return equal(back, event)


@FUZZ
@given(st.sampled_from([f.name for f in dataclasses.fields(Kinds)]), HOSTILE)
def test_the_check_accepts_exactly_what_the_decoder_gives_back_equal(name: str, value: Any) -> None:
    event = kinds(**{name: value})
    if decodes_back_equal(event):
        assert exact(KINDS.encode_checked(event), KINDS.encode(event))
    else:
        with pytest.raises(errors.InvalidEvent, match=r"^Kinds\."):
            KINDS.encode_checked(event)


@FUZZ
@given(st.sampled_from([*typing.get_type_hints(Kinds).values(), LineItem, OrderPlaced]), HOSTILE)
def test_the_compiled_shortcut_passes_only_values_that_round_trip_or_cannot_be_encoded(hint: Any, value: Any) -> None:
    # encode_checked explains an encoding failure after the shortcut, field by field.
    if codec._fitting(hint)(value):
        try:
            codec.packb(value)
        except errors.CodecError:
            return
        assert codec._failure(value, hint, "x") is None


def test_an_unregistered_class_is_still_an_unknown_event_type() -> None:
    with pytest.raises(errors.UnknownEventType):
        KINDS.encode_checked(ITEM)


def test_raw_ext_types_in_an_any_field_are_accepted_only_if_they_decode() -> None:
    assert round_trip(KINDS, kinds(anything=msgpack.Timestamp(1, 2))) == kinds(anything=msgpack.Timestamp(1, 2))
    assert refusal(KINDS, kinds(anything=msgpack.ExtType(99, b""))) == (
        "Kinds.anything: expected Any, got ExtType (it would not decode: unknown msgpack ext type 99)")

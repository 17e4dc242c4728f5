"""Checking an event before it is stored: it must decode back equal (see the comment below)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import math
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from store import errors
from store.codec.builders import _converter, _plain_class
from store.codec.wire import _zones, packb, unpackb

#
# The log is immutable: an event the decoder refuses is refused on every read. So the store appends only
# events that decode back equal, and the judge is the decoder itself: a value passes when packing it,
# unpacking it and running the decoder's converter for its annotation gives back an equal value
# (``_round_trip``). That costs an encode and a decode, so a predicate compiled per class (``_fitting``)
# first passes the values whose round trip is certain from their classes alone: the exact msgpack and
# ext classes, aware datetimes in zones the decoder gives back as they are, and lists, tuples, str-keyed
# maps, optionals and nested plain dataclasses of them. Anything else (an int in a float field, a
# subclass, an enum, ``Any``, a union, a set, a class with a ``__post_init__``) takes the round trip,
# which also says what is wrong; the predicate decides nothing but what is safe to skip.

Fits = Callable[[Any], bool]
_fits: dict[Any, Fits] = {}
#: Annotations whose values round-trip exactly when they are of that very class.
_EXACT_FITS: tuple[type[Any], ...] = (str, int, float, bool, bytes, decimal.Decimal, dt.date, uuid.UUID, type(None))


def check(payload: object) -> None:
    """Raise ``InvalidEvent`` unless encoding payload (a dataclass instance) and decoding it as its class
    gives back an equal instance; the message names the field, the type it expects and the value's."""
    cls = type(payload)
    fits = _fits.get(cls)
    if fits is None:
        fits = _fitting(cls)
    if not fits(payload):
        _check_slowly(payload)


def encode_metadata(metadata: Mapping[str, Any]) -> bytes:
    """An event's metadata packed, refused (InvalidEvent) unless it unpacks again: every read of the
    event unpacks it too, and msgpack gives maps back only with text or bytes keys."""
    try:
        data = packb(dict(metadata))
        unpackb(data)
    except errors.CodecError as exc:
        raise errors.InvalidEvent(f"metadata: expected a map msgpack can decode, got {type(metadata).__name__}"
                                  f" ({exc.__cause__ or exc})") from exc
    return data


def _check_slowly(payload: object, *, every_field: bool = False) -> None:
    """Round-trip the fields that ``_fitting`` does not pass (all of them with every_field), or the whole
    event when its class does more than set its fields."""
    cls: type[Any] = type(payload)
    fields = _checked_fields.get(cls)
    if fields is None:
        fields = _checked_fields[cls] = _fields_to_check(cls)
    if not fields:
        _round_trip(payload, cls, cls.__name__)
        return
    for name, hint, fits, where in fields:
        value = getattr(payload, name)
        if every_field or not fits(value):
            _round_trip(value, hint, where)


#: By class: (name, annotation, predicate, where) of each field; empty for a class that is not plain.
_checked_fields: dict[type[Any], list[tuple[str, Any, Fits, str]]] = {}


def _fields_to_check(cls: type[Any]) -> list[tuple[str, Any, Fits, str]]:
    if not _plain_class(cls):
        return []
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], _fitting(hints[f.name]), f"{cls.__name__}.{f.name}")
            for f in dataclasses.fields(cls)]


def _fitting(hint: Any) -> Fits:
    """The (cached) predicate passing values of hint whose round trip is certain without trying it."""
    try:
        found = _fits.get(hint)
    except TypeError:  # an unhashable annotation
        return _never
    if found is None:
        found = _fits[hint] = _make_fits(hint)
    return found


def _never(value: Any) -> bool:
    return False


def _make_fits(hint: Any) -> Fits:
    # The branches follow _make_converter's, each passing only values its converter gives back as they are.
    origin = typing.get_origin(hint)
    exact = _exact_fit(hint)
    if exact is not None:
        return lambda value: type(value) is exact
    if hint is dt.datetime:
        return _fits_datetime
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if len(options) == 2 and type(None) in options:
            inner = _fitting(options[0] if options[1] is type(None) else options[1])
            return lambda value: value is None or inner(value)
        # The decoder takes the first option whose converter takes the value: the first gives it back.
        return _fitting(options[0])
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            positional = [_fitting(a) for a in args]
            n = len(positional)
            return lambda value: (type(value) is tuple and len(value) == n
                                  and all(f(v) for f, v in zip(positional, value, strict=True)))
        item = _fitting(args[0] if args else Any)
        container = origin or hint
        return lambda value: type(value) is container and all(map(item, value))
    if origin is dict or hint is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        if key_t is not str and key_t is not Any:
            return _never  # msgpack map keys are text or bytes (strict_map_key); the round trip says so
        val = _fitting(val_t)
        return lambda value: type(value) is dict and all(type(k) is str and val(v) for k, v in value.items())
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _compile_fits(hint)
    return _never  # Any, sets, other classes: what they give back is the round trip's to say


def _exact_fit(hint: object) -> type[Any] | None:
    for exact in _EXACT_FITS:
        if hint is exact:
            return exact
    return None


def _fits_datetime(value: Any) -> bool:
    """An aware datetime whose zone decodes to itself: a fixed offset, or a named zone that is the very
    object the decoder's cache gives for its key (else the round trip checks it, and fills the cache)."""
    if type(value) is not dt.datetime:
        return False
    tz = value.tzinfo
    return type(tz) is dt.timezone or (type(tz) is zoneinfo.ZoneInfo and _zones.get(tz.key) is tz)


def _compile_fits(cls: type[Any]) -> Fits:
    """The predicate of a plain dataclass, generated as the decoder's builders are: its exact class, and
    each field passing its annotation's predicate (an exact class inline)."""
    if not _plain_class(cls):
        return _never
    _fits[cls] = lambda value: _fits[cls](value)  # a class nested in itself finds it, compiled or not
    try:
        hints = typing.get_type_hints(cls)
        namespace: dict[str, Any] = {"cls": cls}
        terms = ["type(o) is cls"]
        for i, f in enumerate(dataclasses.fields(cls)):
            hint = hints[f.name]
            exact = _exact_fit(hint)
            if exact is not None:
                namespace[f"t{i}"] = exact
                terms.append(f"type(o.{f.name}) is t{i}")
            else:
                namespace[f"f{i}"] = _fitting(hint)
                terms.append(f"f{i}(o.{f.name})")
        exec(f"def fits(o):\n    return {' and '.join(terms)}", namespace)  # noqa: S102 - names checked
    except BaseException:
        del _fits[cls]
        raise
    fits: Fits = namespace["fits"]
    fits.__qualname__ = f"fits_{cls.__qualname__}"
    return fits


def _round_trip(value: Any, hint: Any, where: str) -> None:
    """Pack value, unpack it and convert it for hint as the decoder does; raise InvalidEvent unless that
    gives back an equal value."""
    reason = _failure(value, hint, where)
    if reason is not None:
        raise _explain(value, hint, where, reason)


def _failure(value: Any, hint: Any, where: str) -> str | None:
    """None when value round-trips for hint, else why not ("" when its class says it all)."""
    try:
        data = packb(value)
    except Exception as exc:  # noqa: BLE001 - whatever packing raises, this value cannot be stored
        if isinstance(value, dt.datetime) and value.utcoffset() is None:
            return ""
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            return "outside msgpack's integers, -2**63 to 2**64-1"
        return str(exc)
    try:
        raw = unpackb(data)
    except errors.CodecError as exc:
        return f"it would not decode: {exc.__cause__ or exc}"
    try:
        back = _converter(hint)(raw, where)
    except errors.EventSchemaMismatch as exc:
        if not str(exc).startswith(f"{where}:"):  # refused inside a class of its own: say what the decoder says
            return f"the decoder says: {exc}"
        if type(raw) is type(value) or (isinstance(raw, list) and isinstance(value, tuple)):
            return ""  # its class (or length) says it: msgpack gives any sequence back as a list
        return f"it would be read back as {type(raw).__name__}"
    except Exception as exc:  # noqa: BLE001 - a __post_init__, say: the decoder would raise it on every read
        return f"decoding it raises {type(exc).__name__}: {exc}"
    if _same(back, value):
        return None
    if type(back) is not type(value):
        return f"it would be read back as {type(back).__name__}"
    return "it would be read back as a different value"


def _explain(value: Any, hint: Any, where: str, reason: str) -> errors.InvalidEvent:
    """The error for a value that does not round-trip: about the innermost part of it that does not."""
    return errors.InvalidEvent(_locate(value, hint, where, reason)[1])


def _locate(value: Any, hint: Any, where: str, reason: str) -> tuple[str, str]:
    for part, part_hint, part_where in _parts(value, hint, where):
        part_reason = _failure(part, part_hint, part_where)
        if part_reason is not None:
            found = _locate(part, part_hint, part_where, part_reason)
            if found[0] != where:  # deeper in; else (the X of an X | None) the whole annotation says more
                return found
            break
    message = f"{where}: expected {_describe(hint, top=True)}, got {_kind(value, hint)}"
    return where, f"{message} ({reason})" if reason else message


def _parts(value: Any, hint: Any, where: str) -> Iterable[tuple[Any, Any, str]]:
    """The items, entries or fields of value that hint has annotations for (``Any`` for ``Any``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if value is not None and len(others) == 1:
            yield value, others[0], where
    elif origin in (list, tuple, set, frozenset) or hint in (list, tuple, Any):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
                if len(args) == len(value):
                    yield from ((v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
            else:
                item = args[0] if args else Any
                yield from ((v, item, f"{where}[{i}]") for i, v in enumerate(value))
        elif hint is Any and isinstance(value, dict):
            yield from _entries(value, Any, Any, where)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            key_t, val_t = args or (Any, Any)
            yield from _entries(value, key_t, val_t, where)
    elif dataclasses.is_dataclass(hint) and isinstance(hint, type) and isinstance(value, hint):
        hints = typing.get_type_hints(hint)
        yield from ((getattr(value, f.name), hints[f.name], f"{where}.{f.name}")
                    for f in dataclasses.fields(hint) if f.init)


def _entries(value: dict[Any, Any], key_t: Any, val_t: Any, where: str) -> Iterable[tuple[Any, Any, str]]:
    for k, v in value.items():
        yield k, key_t, f"{where} key {k!r}"
        yield v, val_t, f"{where}[{k!r}]"


def _describe(hint: Any, *, top: bool = False) -> str:
    if hint is dt.datetime and top:
        return "timezone-aware datetime"
    if hint is type(None):
        return "None"
    if hint is Any:
        return "Any"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple, dict, set, frozenset):
        args = ", ".join("..." if a is Ellipsis else _describe(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if isinstance(hint, type):
        return hint.__name__
    return repr(hint).removeprefix("typing.")


def _kind(value: Any, hint: Any) -> str:
    if isinstance(value, dt.datetime) and value.utcoffset() is None:
        return "naive datetime"
    args = typing.get_args(hint)
    if (typing.get_origin(hint) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
            and isinstance(value, (list, tuple)) and len(value) != len(args)):
        return f"{type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return type(value).__name__


def _same(a: Any, b: Any) -> bool:
    """Equal, or equal but for NaNs in the same places (a NaN is unequal to itself, and a signalling
    Decimal NaN raises when compared)."""
    try:
        if a == b:
            return True
    except ArithmeticError:
        pass
    if isinstance(a, decimal.Decimal) and isinstance(b, decimal.Decimal):
        return a.is_nan() and a.as_tuple() == b.as_tuple()
    if isinstance(a, float) and isinstance(b, float):
        return math.isnan(a) and math.isnan(b)
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return False


"""msgpack encoding of events, the registry of event classes and upcasting of old versions.

Values round-trip exactly: timezone-aware ``datetime`` (with its zone), ``date``, ``Decimal`` and
``UUID`` are msgpack ext types. Event classes are frozen dataclasses registered under ``Name.vN``;
decoding builds the current class of that name, upcasting older versions field mapping by field mapping.
``Registry.encode_checked``, which the store appends with, refuses an event that the decoder would not
give back equal (see ``check``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import inspect
import keyword
import math
import threading
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import msgpack

from store import errors

_EXT_DATETIME = 1
_EXT_DECIMAL = 2
_EXT_UUID = 3
_EXT_DATE = 4
_MICROSECOND = dt.timedelta(microseconds=1)

Fields = dict[str, Any]
Upcaster = Callable[[Fields], Fields]
T = TypeVar("T")


# --- msgpack with exact ext types -------------------------------------------------------------------


def _default(value: object) -> msgpack.ExtType:
    if isinstance(value, dt.datetime):
        offset = value.utcoffset()
        if offset is None:
            raise errors.CodecError(f"naive datetime {value.isoformat()} cannot be encoded: make it timezone-aware")
        tz = value.tzinfo
        key = tz.key if isinstance(tz, zoneinfo.ZoneInfo) else None
        # A named zone keeps its rules; anything else (or a ZoneInfo read from a file, without a key) keeps
        # its offset, in whole microseconds (timedelta division is exact, float seconds are not).
        zone: str | int = key if key is not None else offset // _MICROSECOND
        body = [value.toordinal(), value.hour * 3600 + value.minute * 60 + value.second, value.microsecond,
                value.fold, zone]
        return msgpack.ExtType(_EXT_DATETIME, _PACKERS.body.pack(body))
    if isinstance(value, dt.date):
        return msgpack.ExtType(_EXT_DATE, _PACKERS.body.pack(value.toordinal()))
    if isinstance(value, decimal.Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(value).encode("ascii"))
    if isinstance(value, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, value.bytes)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}  # type: ignore[return-value]
    if isinstance(value, (set, frozenset)):
        return sorted(value)  # type: ignore[return-value]
    raise errors.CodecError(f"cannot encode a value of type {type(value).__name__}")


def _ext_hook(code: int, data: bytes) -> object:
    # Decoding is a hot path: zones, days and decimals repeat across events, so each is worked out once.
    if code == _EXT_DATETIME:
        ordinal, seconds, micros, fold, zone = msgpack.unpackb(data)
        tz = _zones.get(zone)
        if tz is None:
            tz = _zone(zone)
        day = _days.get(ordinal) if type(ordinal) is int else None  # 1.0 and True are no days
        if day is None:
            day = _day(ordinal)
        return dt.datetime(day.year, day.month, day.day, seconds // 3600, seconds // 60 % 60, seconds % 60,
                           micros, tz, fold=fold)
    if code == _EXT_DECIMAL:
        value = _decimals.get(data)
        if value is None:
            value = _decimal(data)
        return value
    if code == _EXT_DATE:
        return dt.date.fromordinal(msgpack.unpackb(data))
    if code == _EXT_UUID:
        return uuid.UUID(bytes=data)
    raise errors.CorruptEvent(f"unknown msgpack ext type {code}")


# Bounded caches of the ext hook (values are immutable; the bound keeps hostile input from growing them).
_CACHE_SIZE = 4096
_zones: dict[object, dt.tzinfo] = {}
_days: dict[object, dt.date] = {}
_decimals: dict[bytes, decimal.Decimal] = {}


def _remember(cache: dict[Any, Any], key: object, value: T) -> T:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _zone(zone: Any) -> dt.tzinfo:
    if isinstance(zone, str):
        return _remember(_zones, zone, zoneinfo.ZoneInfo(zone))
    return _remember(_zones, zone, dt.timezone(dt.timedelta(microseconds=zone)))


def _day(ordinal: object) -> dt.date:
    if type(ordinal) is not int:  # a bool is no day
        raise TypeError(f"a datetime's day is an ordinal, not {type(ordinal).__name__}")
    return _remember(_days, ordinal, dt.date.fromordinal(ordinal))


def _decimal(data: bytes) -> decimal.Decimal:
    return _remember(_decimals, data, decimal.Decimal(data.decode("ascii")))


class _Packers(threading.local):
    """Reusable packers, one set per thread: ``msgpack.packb`` allocates a 256 KiB buffer per call."""

    def __init__(self) -> None:
        self.main = msgpack.Packer(default=_default, use_bin_type=True, datetime=False)
        # Ext bodies are packed while ``main`` is mid-pack, so they need a packer of their own.
        self.body = msgpack.Packer(use_bin_type=True)


_PACKERS = _Packers()


def packb(value: object) -> bytes:
    """Encode a value (maps, lists, scalars, dataclasses and the ext types) to msgpack."""
    try:
        return _PACKERS.main.pack(value)
    except errors.CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.CodecError(f"cannot encode: {exc}") from exc


def unpackb(data: bytes) -> Any:
    """Decode msgpack bytes written by packb; raise CorruptEvent on anything else."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True,
                               timestamp=0)
    except errors.CodecError:
        raise
    except Exception as exc:  # msgpack raises many unrelated types for corrupt input
        raise errors.CorruptEvent(f"corrupt msgpack: {type(exc).__name__}: {exc}") from exc


# --- registry of event classes ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    version: int
    cls: type[Any]
    fields: tuple[str, ...]


class Registry:
    """Event classes by name and version, and the upcasters between versions."""

    def __init__(self) -> None:
        self._by_type: dict[type[Any], _Registered] = {}
        self._by_name: dict[str, dict[int, _Registered]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._plans: dict[str, tuple[str, int, _Registered]] = {}  # by event type; see _plan

    def event(self, name: str, *, version: int = 1) -> Callable[[type[T]], type[T]]:
        """Register a frozen dataclass as event ``name`` at ``version``; its type name is ``Name.vN``."""

        def register(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                raise TypeError(f"{cls.__name__} must be a frozen dataclass to be an event")
            if version < 1 or "." in name or not name:
                raise ValueError(f"invalid event name/version {name!r}/{version}")
            versions = self._by_name.setdefault(name, {})
            if version in versions and versions[version].cls is not cls:
                raise ValueError(f"{name}.v{version} is already registered")
            entry = _Registered(name, version, cls, tuple(f.name for f in dataclasses.fields(cls)))
            versions[version] = entry
            self._plans.clear()  # a newer version changes what older types decode to
            self._by_type[cls] = entry
            return cls

        return register

    def upcaster(self, name: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning the fields of ``name`` v``from_version`` into v``from_version+1``."""

        def register(fn: Upcaster) -> Upcaster:
            self._upcasters[(name, from_version)] = fn
            self._plans.clear()
            return fn

        return register

    def type_name(self, payload: object) -> str:
        """The ``Name.vN`` of a registered event instance."""
        entry = self._by_type.get(type(payload))
        if entry is None:
            raise errors.UnknownEventType(f"{type(payload).__name__} is not a registered event class")
        return f"{entry.name}.v{entry.version}"

    def name_of(self, cls: type[Any]) -> str | None:
        """The registered name (without version) of an event class, None if it is not registered."""
        entry = self._by_type.get(cls)
        return None if entry is None else entry.name

    def current_type_name(self, name: str) -> str:
        """The ``Name.vN`` of the newest registered version of ``name``."""
        versions = self._by_name.get(name)
        if not versions:
            raise errors.UnknownEventType(f"no event named {name!r}")
        return f"{name}.v{max(versions)}"

    def known(self, event_type: str) -> bool:
        """Whether event_type names a registered name at or below its newest version."""
        try:
            name, version = _split(event_type)
        except errors.UnknownEventType:
            return False
        versions = self._by_name.get(name)
        return versions is not None and version <= max(versions)

    def encode(self, payload: object) -> tuple[str, bytes]:
        """Return (event_type, data) for an event instance."""
        entry = self._by_type.get(type(payload))
        if entry is None:
            raise errors.UnknownEventType(f"{type(payload).__name__} is not a registered event class")
        return f"{entry.name}.v{entry.version}", packb({name: getattr(payload, name) for name in entry.fields})

    def encode_checked(self, payload: object) -> tuple[str, bytes]:
        """Like ``encode``, having made sure that decoding the data builds an event equal to payload
        (``check``); raise ``InvalidEvent``, naming the field, the type it expects and the value's type,
        when it would not. An event of an older version must also upcast to the newest, as every read
        of it will. What the store appends with this can always be read back."""
        entry = self._by_type.get(type(payload))
        if entry is None:
            raise errors.UnknownEventType(f"{type(payload).__name__} is not a registered event class")
        check(payload)
        event_type = f"{entry.name}.v{entry.version}"
        try:
            data = packb({name: getattr(payload, name) for name in entry.fields})
        except errors.CodecError:
            _check_slowly(payload, every_field=True)  # says which field cannot be encoded
            raise
        plan = self._plans.get(event_type)
        if plan is None:
            plan = self._plan(event_type)
        if plan[2] is not entry:
            try:
                self.decode(event_type, data)
            except errors.CodecError as exc:
                raise errors.InvalidEvent(f"{event_type} would not upcast to v{plan[2].version}: {exc}") from exc
        return event_type, data

    def decode(self, event_type: str, data: bytes) -> Any:
        """Decode data stored as event_type into an instance of the newest class of that name."""
        plan = self._plans.get(event_type) if isinstance(event_type, str) else None
        if plan is None:
            plan = self._plan(event_type)
        name, version, current = plan
        fields = unpackb(data)
        if not isinstance(fields, dict):
            raise errors.CorruptEvent(f"{event_type} data is a {type(fields).__name__}, not a map")
        for step in range(version, current.version):
            upcast = self._upcasters.get((name, step))
            if upcast is None:
                raise errors.UnknownEventType(f"no upcaster from {name}.v{step} to v{step + 1}")
            try:
                fields = upcast(dict(fields))
            except Exception as exc:  # old data the upcaster cannot read is poison, not a crash
                raise errors.EventSchemaMismatch(
                    f"upcasting {name}.v{step} failed: {type(exc).__name__}: {exc}") from exc
            if not isinstance(fields, dict):
                raise errors.EventSchemaMismatch(f"upcaster of {name}.v{step} returned a {type(fields).__name__}")
        return build(current.cls, fields)

    def _plan(self, event_type: str) -> tuple[str, int, _Registered]:
        """The name, version and newest registration of a known event type (remembered: decoding is a hot
        path), or UnknownEventType."""
        name, version = _split(event_type)
        versions = self._by_name.get(name)
        if not versions:
            raise errors.UnknownEventType(f"unknown event type {event_type!r}")
        current = versions[max(versions)]
        if version > current.version:
            raise errors.NewerEventVersion(f"event type {event_type!r} is newer than this code (v{current.version})")
        plan = (name, version, current)
        if len(self._plans) < 1024:  # spellings of known types only ("v1", "v01", ...), but bounded anyway
            self._plans[event_type] = plan
        return plan


def _split(event_type: str) -> tuple[str, int]:
    if not isinstance(event_type, str):
        raise errors.UnknownEventType(f"event type must be text, got {type(event_type).__name__}")
    name, sep, version = event_type.rpartition(".v")
    # ASCII digits only: superscript two is isdigit() but not int(), Arabic-Indic one would alias v1;
    # at most 9 digits keep int() cheap.
    if not sep or not name or not (version.isascii() and version.isdigit() and len(version) <= 9):
        raise errors.UnknownEventType(f"malformed event type {event_type!r}: expected Name.vN")
    return name, int(version)


# --- type-directed construction of dataclasses from decoded values -------------------------------------

def build(cls: type[T], fields: Mapping[str, Any]) -> T:
    """Construct dataclass cls from a decoded mapping, checking every field against its annotation."""
    builder = _builders.get(cls)
    if builder is None:
        builder = _builders[cls] = _compile(cls)
    return builder(fields)  # type: ignore[no-any-return]


Convert = Callable[[Any, str], Any]
Builder = Callable[[Mapping[str, Any]], Any]
_builders: dict[type[Any], Builder] = {}
_converters: dict[Any, Convert] = {}
_exact: dict[Convert, type[Any]] = {}  # scalar converters, by the one class they pass through unchanged


def _compile(cls: type[Any]) -> Builder:
    """The function building cls from a decoded map, generated once per class as dataclasses generates
    ``__init__`` (decoding is the hot path of catch-ups and deliveries).

    A map with exactly the init fields goes straight through: each value of its field's exact scalar class
    is taken as is, any other goes through the field's converter, and cls is called positionally. Any
    other map (an unknown field, a missing one that may have a default) takes ``_build_general``, which
    says what is wrong. Both give the same result or the same error for every map.
    """
    hints = typing.get_type_hints(cls)
    fields = [(f.name, f"{cls.__name__}.{f.name}", _converter(hints[f.name]))
              for f in dataclasses.fields(cls) if f.init]
    names = frozenset(name for name, _, _ in fields)

    def general(values: Mapping[str, Any]) -> Any:
        return _build_general(cls, fields, names, values)

    if not _plain(names):
        return general
    make = constructor(cls)
    # Positional while __init__'s parameters follow the fields (an InitVar or a hand-written __init__
    # may not), by keyword from there.
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    namespace: dict[str, Any] = {"make": make, "names": names, "general": general,
                                 "Mismatch": errors.EventSchemaMismatch, "name": cls.__name__}
    body = ["    if values.keys() != names:", "        return general(values)"]
    arguments: list[str] = []
    for i, (name, where, convert) in enumerate(fields):
        namespace[f"convert{i}"], namespace[f"where{i}"] = convert, where
        body.append(f"    v{i} = values[{name!r}]")
        exact = _exact.get(convert)
        if exact is not None:
            namespace[f"exact{i}"] = exact
            body += [f"    if type(v{i}) is not exact{i}:", f"        v{i} = convert{i}(v{i}, where{i})"]
        else:
            body.append(f"    v{i} = convert{i}(v{i}, where{i})")
        positional = make is not cls or (
            len(arguments) == i and i < len(parameters) and parameters[i].name == name
            and parameters[i].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        arguments.append(f"v{i}" if positional else f"{name}=v{i}")
    body += ["    try:", f"        return make({', '.join(arguments)})", "    except TypeError as exc:",
             "        raise Mismatch(f'{name}: {exc}') from exc"]
    exec("\n".join(["def build(values):", *body]), namespace)  # noqa: S102 - names checked, values bound
    built: Builder = namespace["build"]
    built.__qualname__ = f"build_{cls.__qualname__}"
    return built


_constructors: dict[type[Any], Callable[..., Any]] = {}
#: The code of the ``__init__`` that dataclasses generates (Python 3.11 to 3.13).
_GENERATED_INIT = "__create_fn__.<locals>.__init__"


def constructor(cls: type[T]) -> Callable[..., T]:
    """A positional constructor of dataclass cls: the same as calling cls with every field in order.

    For a frozen slots dataclass whose ``__init__`` dataclasses generated (no ``__post_init__``, no
    InitVar, every field in ``__init__``) it is a function that fills the slots directly: that ``__init__``
    goes through ``object.__setattr__`` once per field, which is most of the cost of decoding an event.
    Any other class gets cls itself, so the shortcut is only ever taken where it cannot differ.
    """
    found = _constructors.get(cls)
    if found is None:
        found = _constructors[cls] = _make_constructor(cls)
    return found


def _make_constructor(cls: type[Any]) -> Callable[..., Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    if not (_plain_class(cls) and all(isinstance(cls.__dict__.get(n), types.MemberDescriptorType) for n in names)):
        return cls
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = [f"def make({', '.join(f'v{i}' for i in range(len(names)))}):", "    o = new(cls)"]
    for i, name in enumerate(names):
        namespace[f"set{i}"] = cls.__dict__[name].__set__
        lines.append(f"    set{i}(o, v{i})")
    lines.append("    return o")
    exec("\n".join(lines), namespace)  # noqa: S102 - names checked, values bound
    make: Callable[..., Any] = namespace["make"]
    make.__qualname__ = f"make_{cls.__qualname__}"
    return make


def _plain_class(cls: type[Any]) -> bool:
    """Whether cls is a frozen dataclass whose ``__init__`` dataclasses generated, with every field in it and
    in order, and no ``__post_init__``: constructing it sets the given values and does nothing else."""
    if not dataclasses.is_dataclass(cls):
        return False
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    init: Any = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    return bool(cls.__dataclass_params__.frozen and code is not None  # type: ignore[attr-defined]
                and code.co_qualname == _GENERATED_INIT and not hasattr(cls, "__post_init__")
                and all(f.init for f in fields) and list(inspect.signature(init).parameters)[1:] == names
                and _plain(names))


def _plain(names: Iterable[str]) -> bool:
    """Whether every field name can stand as a name in generated code (dataclass fields may not, if made
    with make_dataclass and odd strings); the generated functions are only made for such classes."""
    return all(name.isidentifier() and not keyword.iskeyword(name) for name in names)


def _build_general(cls: type[Any], fields: list[tuple[str, str, Convert]], names: frozenset[str],
                   values: Mapping[str, Any]) -> Any:
    if not names.issuperset(values):
        unknown = set(values) - names
        raise errors.EventSchemaMismatch(f"{cls.__name__} has no fields {sorted(unknown)}")
    kwargs = {}
    for name, where, convert in fields:
        if name in values:  # else a default may apply; a missing required field fails below
            kwargs[name] = convert(values[name], where)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise errors.EventSchemaMismatch(f"{cls.__name__}: {exc}") from exc


def _converter(hint: Any) -> Convert:
    """The (cached) function checking and converting a decoded value for a type annotation."""
    try:
        found = _converters.get(hint)
    except TypeError:  # an unhashable annotation: work it out each time
        return _make_converter(hint)
    if found is None:
        found = _converters[hint] = _make_converter(hint)
    return found


def _mismatch(where: str, expected: str, value: Any) -> errors.EventSchemaMismatch:
    return errors.EventSchemaMismatch(f"{where}: expected {expected}, got {type(value).__name__}")


def _make_converter(hint: Any) -> Convert:
    origin = typing.get_origin(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        options = [_converter(option) for option in typing.get_args(hint)]

        def union(value: Any, where: str) -> Any:
            for option in options:
                try:
                    return option(value, where)
                except errors.EventSchemaMismatch:
                    continue
            raise errors.EventSchemaMismatch(f"{where}: {value!r} fits none of {hint}")

        return union
    if hint is type(None):

        def none(value: Any, where: str) -> Any:
            if value is None:
                return None
            raise _mismatch(where, "None", value)

        return none
    if origin in (list, tuple, frozenset, set) or hint in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            positional = [_converter(a) for a in args]

            def fixed_tuple(value: Any, where: str) -> Any:
                if not isinstance(value, (list, tuple)):
                    raise _mismatch(where, "a sequence", value)
                if len(positional) != len(value):
                    raise errors.EventSchemaMismatch(f"{where}: expected {len(positional)} items")
                return tuple(c(v, where) for c, v in zip(positional, value, strict=True))

            return fixed_tuple
        item = _converter(args[0] if args else Any)
        container = origin or hint

        def sequence(value: Any, where: str) -> Any:
            if not isinstance(value, (list, tuple)):
                raise _mismatch(where, "a sequence", value)
            inner = f"{where}[]"
            return container([item(v, inner) for v in value])

        return sequence
    if origin is dict or hint is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        key, val = _converter(key_t), _converter(val_t)

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise _mismatch(where, "a map", value)
            return {key(k, where): val(v, where) for k, v in value.items()}

        return mapping
    if dataclasses.is_dataclass(hint):

        def nested(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise errors.EventSchemaMismatch(f"{where}: expected a map for {hint!r}")
            return build(hint, value)  # type: ignore[arg-type]

        return nested
    if isinstance(hint, type):
        return _scalar(hint)
    return lambda value, where: value


def _scalar(hint: type[Any]) -> Convert:
    def scalar(value: Any, where: str) -> Any:
        # type() is checked first: the exact type is the common case and the cheapest test.
        if type(value) is hint:
            return value
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if (hint is int and isinstance(value, bool)) or (hint is dt.date and isinstance(value, dt.datetime)):
            raise _mismatch(where, hint.__name__, value)
        if not isinstance(value, hint):
            raise _mismatch(where, hint.__name__, value)
        return value

    _exact[scalar] = hint
    return scalar


# --- checking an event before it is stored ----------------------------------------------------------
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


# The process-wide registry behind ``store.event`` / ``store.upcaster``.
REGISTRY = Registry()


#: The msgpack ext hook of stored bytes (``datetime``, ``Decimal``, ``UUID``...), for readers of whole
#: message bodies that decode with ``msgpack.unpackb`` themselves (``workers.broker.from_body``).
ext_hook = _ext_hook

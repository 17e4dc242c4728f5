"""msgpack encoding of events, the registry of event classes and upcasting of old versions.

Values round-trip exactly: timezone-aware ``datetime`` (with its zone), ``date``, ``Decimal`` and
``UUID`` are msgpack ext types. Event classes are frozen dataclasses registered under ``Name.vN``;
decoding builds the current class of that name, upcasting older versions field mapping by field mapping.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import inspect
import keyword
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
            raise errors.UnknownEventType(f"event type {event_type!r} is newer than this code (v{current.version})")
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
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    init: Any = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    if not (cls.__dataclass_params__.frozen and code is not None
            and code.co_qualname == _GENERATED_INIT and not hasattr(cls, "__post_init__")
            and all(f.init for f in fields) and list(inspect.signature(init).parameters)[1:] == names
            and all(isinstance(cls.__dict__.get(n), types.MemberDescriptorType) for n in names)
            and _plain(names)):
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


# The process-wide registry behind ``store.event`` / ``store.upcaster``.
REGISTRY = Registry()


#: The msgpack ext hook of stored bytes (``datetime``, ``Decimal``, ``UUID``...), for readers of whole
#: message bodies that decode with ``msgpack.unpackb`` themselves (``workers.broker.from_body``).
ext_hook = _ext_hook

"""The registry of event classes by name and version, and the upcasting of old versions to the newest."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from store import errors
from store.codec.builders import build
from store.codec.checking import _check_slowly, check
from store.codec.wire import packb, unpackb

Fields = dict[str, Any]
Upcaster = Callable[[Fields], Fields]
T = TypeVar("T")



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


# The process-wide registry behind ``store.event`` / ``store.upcaster``.
REGISTRY = Registry()

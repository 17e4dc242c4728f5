"""The registry of event classes by name and version, and the upcasting of old versions to the newest."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from store import errors
from store.codec import closing, personal
from store.codec.builders import build
from store.codec.checking import _check_slowly, check
from store.codec.cipher import (
    SEALED_KEY,
    Cipher,
    Sealed,
    event_aad,
    group_subjects,
    sealed_subjects,
    snapshot_aad,
)
from store.codec.personal import PersonalField
from store.codec.wire import packb, unpackb

Fields = dict[str, Any]
#: Where a stored map was stored: (event id, stream id) of an event, (None, stream id) of a snapshot. The
#: associated data of its sealed personal values (store/codec/cipher.py) is made of it.
Origin = tuple[uuid.UUID | None, str]
Upcaster = Callable[[Fields], Fields]
T = TypeVar("T")
_ABSENT = object()



@dataclasses.dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    version: int
    cls: type[Any]
    fields: tuple[str, ...]
    personal: tuple[PersonalField, ...]
    #: The personal fields by subject field, in declaration order: each group is sealed together.
    sealing: tuple[tuple[str, tuple[PersonalField, ...]], ...]


#: The attribute an event class gets when it is registered (in any registry): its name, without the version.
EVENT_NAME_ATTRIBUTE = "__eventfleet_event_name__"


class Registry:
    """Event classes by name and version, and the upcasters between versions.

    ``cipher`` seals and opens personal fields (store/codec/cipher.py): None in a registry as made; a store
    encodes and decodes with ``with_cipher(...)``, a view of the same classes with its subjects' keys.
    Every registry knows the library's own events (``SubjectForgotten``, ``StreamClosed``,
    ``StreamArchived``)."""

    def __init__(self) -> None:
        self._by_type: dict[type[Any], _Registered] = {}
        self._by_name: dict[str, dict[int, _Registered]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._plans: dict[str, tuple[str, int, _Registered]] = {}  # by event type; see _plan
        self.cipher: Cipher | None = None
        self.event("SubjectForgotten")(personal.SubjectForgotten)
        self.event("StreamClosed")(closing.StreamClosed)
        self.event("StreamArchived")(closing.StreamArchived)

    def with_cipher(self, cipher: Cipher) -> Registry:
        """This registry (the same classes and upcasters, registered before or after) sealing and opening
        personal fields with cipher."""
        view = copy.copy(self)  # shares the dicts: a class registered later is known to both
        view.cipher = cipher
        return view

    def personal(self, cls: type[Any]) -> tuple[personal.PersonalField, ...]:
        """The personal fields of a registered class (empty for any other)."""
        entry = self._by_type.get(cls)
        return entry.personal if entry is not None else ()

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
            found = personal.personal_fields(cls)
            entry = _Registered(name, version, cls, tuple(f.name for f in dataclasses.fields(cls)), found,
                                personal.groups(found))
            versions[version] = entry
            self._plans.clear()  # a newer version changes what older types decode to
            self._by_type[cls] = entry
            # The class carries its name: what a projection handles is known whichever registry has it.
            setattr(cls, EVENT_NAME_ATTRIBUTE, name)
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
        """The registered name (without version) of an event class, None if it is not registered (here)."""
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

    def encode(self, payload: object, origin: Origin | None = None) -> tuple[str, bytes]:
        """Return (event_type, data) for an event instance, its personal fields sealed for origin."""
        entry = self._by_type.get(type(payload))
        if entry is None:
            raise errors.UnknownEventType(f"{type(payload).__name__} is not a registered event class")
        fields = {name: getattr(payload, name) for name in entry.fields}
        if entry.personal:
            self._seal(entry, fields, origin)
        return f"{entry.name}.v{entry.version}", packb(fields)

    def encode_checked(self, payload: object, origin: Origin | None = None) -> tuple[str, bytes]:
        """Like ``encode``, having made sure that decoding the data builds an event equal to payload
        (``check``); raise ``InvalidEvent``, naming the field, the type it expects and the value's type,
        when it would not. An event of an older version must also upcast to the newest, as every read
        of it will. What the store appends with this can always be read back. Personal fields are
        sealed for origin (its event id and stream) after the check."""
        entry = self._by_type.get(type(payload))
        if entry is None:
            raise errors.UnknownEventType(f"{type(payload).__name__} is not a registered event class")
        try:
            check(payload)
        except errors.InvalidEvent:
            if not entry.personal:
                raise
            check(personal.unerased(payload, entry.personal))  # an erased value is stored as erased
        event_type = f"{entry.name}.v{entry.version}"
        fields = {name: getattr(payload, name) for name in entry.fields}
        plan = self._plans.get(event_type)
        if plan is None:
            plan = self._plan(event_type)
        try:
            # The upcasting check below reads the values in the clear, as a read will see them.
            plain = packb(fields) if plan[2] is not entry or not entry.personal else b""
            if entry.personal:
                self._seal(entry, fields, origin)
            data = packb(fields) if entry.personal else plain
        except errors.CodecError:
            _check_slowly(payload, every_field=True)  # says which field cannot be encoded
            raise
        if plan[2] is not entry:
            try:
                self.decode(event_type, plain)
            except errors.CodecError as exc:
                raise errors.InvalidEvent(f"{event_type} would not upcast to v{plan[2].version}: {exc}") from exc
        return event_type, data

    def _seal(self, entry: _Registered, fields: Fields, origin: Origin | None) -> None:
        """Take the personal values out of fields and put their sealed groups under ``SEALED_KEY``
        (store/codec/cipher.py)."""
        if self.cipher is None:
            raise errors.KeyEncryptionKeyMissing()
        if origin is None:
            raise errors.InvalidInput(f"{entry.name} has personal fields: encoding it needs its event id and stream")
        event_id, stream_id = origin
        aad = event_aad(event_id, stream_id) if event_id is not None else snapshot_aad(stream_id)
        groups: list[bytes] = []
        for subject_field, group in entry.sealing:
            subject = personal.subject_id(fields[subject_field], f"{entry.name}.{subject_field}")
            groups += self.cipher.seal(subject, group, [fields.pop(f.name) for f in group], aad)
        fields[SEALED_KEY] = groups

    def open(self, fields: Fields, origin: Origin | None, names: list[str] | None = None) -> None:
        """Replace the sealed groups of a decoded map (under ``SEALED_KEY``; in the first layout, values of
        type ``Sealed``, under names if known) by their values, or their erased values
        (store/codec/cipher.py)."""
        if SEALED_KEY in fields:
            group_subjects(fields[SEALED_KEY])  # CorruptEvent before any other error when malformed
        if self.cipher is None:
            raise errors.KeyEncryptionKeyMissing()
        if origin is None:
            raise errors.CorruptEvent("a personal value outside an event or snapshot")
        if SEALED_KEY in fields:
            self.cipher.open_groups(fields, origin, fields.pop(SEALED_KEY))
        if names is None:
            names = [k for k, v in fields.items() if type(v) is Sealed]
        if names:
            self.cipher.open_fields(fields, origin, names)

    def preload_keys(self, datas: Iterable[bytes]) -> None:
        """Load the data keys the sealed values of these stored maps need in one go, before decoding them one
        by one (a worker's batch of deliveries, a rebuild's batch of rows)."""
        if self.cipher is not None:
            subjects = sealed_subjects(datas)
            if subjects:
                self.cipher.keyring.preload(subjects)

    def decode(self, event_type: str, data: bytes, origin: Origin | None = None) -> Any:
        """Decode data stored as event_type into an instance of the newest class of that name, opening its
        personal values sealed for origin (before any upcaster: they see values, or erased values)."""
        plan = self._plans.get(event_type) if isinstance(event_type, str) else None
        if plan is None:
            plan = self._plan(event_type)
        name, version, current = plan
        fields = unpackb(data)
        if not isinstance(fields, dict):
            raise errors.CorruptEvent(f"{event_type} data is a {type(fields).__name__}, not a map")
        groups = fields.pop(SEALED_KEY, _ABSENT)
        if groups is not _ABSENT:
            if self.cipher is not None and origin is not None:
                self.cipher.open_groups(fields, origin, groups)
            else:
                fields[SEALED_KEY] = groups
                self.open(fields, origin)  # raises, saying which is missing
        else:
            sealed = None  # the first layout's groups, of events stored before the second
            for key, value in fields.items():
                if type(value) is Sealed:
                    sealed = [key] if sealed is None else [*sealed, key]
            if sealed is not None:
                self.open(fields, origin, sealed)
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


# The process-wide registry behind ``store.event`` / ``store.upcaster``.
REGISTRY = Registry()

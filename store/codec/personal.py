"""Personal fields: the ``Personal`` marker, what a class declares with it, and the erased values.

An event class marks a field personal and names the field holding the id of the person (the *subject*)
the value belongs to::

    email: Annotated[str, ef.Personal(subject="customer_id")]

The store encrypts such fields with the subject's data key (``store.codec.cipher``); once the subject is
forgotten the key is gone and the field decodes to its erased value, the same everywhere:

- a ``str`` field: ``ERASED``, an ``Erased`` (a ``str`` subclass) whose text is ``""``;
- a ``bytes`` field: ``ERASED_BYTES``, an ``ErasedBytes`` (a ``bytes`` subclass), ``b""``;
- an optional field (``X | None``): ``None``.

Why these: a handler written for the field's type keeps working (it can format, concatenate, store in a
``text NOT NULL`` column, test for emptiness), nothing raises, so no event becomes poison because a key is
gone. The subclasses compare unequal to every real value (even ``""``), so erased data never matches a real
value by accident (two forgotten customers' e-mails are not "the same e-mail"), and ``isinstance(v, Erased)``
tells a handler that wants to know. Other field types are refused at registration: an ``int`` or a ``date``
has no value that cannot be mistaken for data, so make such a field optional.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import uuid
from collections.abc import Mapping
from typing import Any

from store import errors


@dataclasses.dataclass(frozen=True, slots=True)
class Personal:
    """Marks an event field as personal data of the subject whose id is in field ``subject``."""

    subject: str


class Erased(str):
    """The value of a personal ``str`` field whose subject was forgotten: ``""``, unequal to any real str."""

    __slots__ = ()

    def __new__(cls) -> typing.Self:
        return super().__new__(cls, "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Erased)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, Erased)

    def __hash__(self) -> int:
        return hash(Erased)

    def __repr__(self) -> str:
        return "ERASED"

    def __reduce__(self) -> tuple[Any, ...]:
        return Erased, ()


class ErasedBytes(bytes):
    """The value of a personal ``bytes`` field whose subject was forgotten: ``b""``, unequal to any real bytes."""

    __slots__ = ()

    def __new__(cls) -> typing.Self:
        return super().__new__(cls, b"")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ErasedBytes)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, ErasedBytes)

    def __hash__(self) -> int:
        return hash(ErasedBytes)

    def __repr__(self) -> str:
        return "ERASED_BYTES"

    def __reduce__(self) -> tuple[Any, ...]:
        return ErasedBytes, ()


ERASED = Erased()
ERASED_BYTES = ErasedBytes()
#: Ext type of an erased value sealed among real ones (its body: its kind), opened as that erased value.
EXT_ERASED = 6

#: The kinds of personal field, as written in a sealed value (so a value reads back erased as the type it
#: was written with, whatever the class has become since), and their erased values.
STR, BYTES, OPTIONAL = "s", "b", "n"
ERASED_VALUES: dict[str, Any] = {STR: ERASED, BYTES: ERASED_BYTES, OPTIONAL: None}


@dataclasses.dataclass(frozen=True, slots=True)
class PersonalField:
    """A personal field of a class: its name, the field with its subject's id, and its kind."""

    name: str
    subject: str
    kind: str


def personal_fields(cls: type[Any]) -> tuple[PersonalField, ...]:
    """The personal fields a dataclass declares (``Annotated[..., Personal(...)]``); TypeError when one is
    of a type without an erased value or names no other field as its subject."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    found: list[PersonalField] = []
    for name in names:
        hint = hints[name]
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        marks = [m for m in hint.__metadata__ if isinstance(m, Personal)]
        if not marks:
            continue
        where = f"{cls.__name__}.{name}"
        if len(name.encode()) > 255:
            raise TypeError(f"{where}: a personal field's name must be at most 255 bytes of UTF-8")
        if len(marks) > 1:
            raise TypeError(f"{where} is marked Personal twice")
        subject = marks[0].subject
        if subject not in names or subject == name:
            raise TypeError(f"{where}: Personal(subject={subject!r}) must name another field of {cls.__name__}")
        found.append(PersonalField(name, subject, _kind(hint.__origin__, where)))
    subjects = {p.subject for p in found}
    if subjects & {p.name for p in found}:
        raise TypeError(f"{cls.__name__}: a subject id field cannot itself be personal")
    return tuple(found)


def unerased(payload: Any, fields: tuple[PersonalField, ...]) -> Any:
    """payload, with erased values (a handler copying a forgotten subject's fields on) as their real empty
    values, for the round-trip check at append: they are stored as erased, and read back as they are."""
    erased = {f.name: type(v).__mro__[1]() for f in fields
              if isinstance(v := getattr(payload, f.name), (Erased, ErasedBytes))}
    return dataclasses.replace(payload, **erased) if erased else payload


#: What a personal value is replaced by in a text (``redact``).
REDACTED = "[personal]"
#: Values shorter than this are not redacted in free text: they would blank out ordinary words and digits.
MIN_REDACTED_LENGTH = 3


def redact(text: str, payload: Any) -> str:
    """text with each personal value of payload (an event or snapshot state; any other object: none) replaced
    by ``[personal]``: for error messages and tracebacks of a handler that formatted the event (a dead letter's
    error, a log line). Bytes values are redacted as Python prints them (their ``repr`` without ``b''``)."""
    if not dataclasses.is_dataclass(payload) or isinstance(payload, type):
        return text
    try:
        fields = personal_fields(type(payload))
    except (TypeError, NameError):
        return text
    values: list[str] = []
    for field in fields:
        value = getattr(payload, field.name, None)
        if isinstance(value, (Erased, ErasedBytes)) or value is None:
            continue
        values += [value] if isinstance(value, str) else [repr(value)[2:-1]] if isinstance(value, bytes) else []
        if isinstance(value, str) and (quoted := repr(value)[1:-1]) != value:
            values.append(quoted)  # as a repr shows it (escaped quotes, non-printables)
    for value in sorted(values, key=len, reverse=True):  # longest first: one value may contain another
        if len(value) >= MIN_REDACTED_LENGTH:
            text = text.replace(value, REDACTED)
    return text


def in_metadata(payload: Any, fields: tuple[PersonalField, ...], metadata: Any) -> str | None:
    """The first personal field of payload whose value (non-empty, not erased) is also a value in metadata (a
    map, searched through its maps and lists), or None: metadata is stored and published in the clear, and
    ``forget`` cannot reach it."""
    values = {v: f.name for f in fields if isinstance(v := getattr(payload, f.name), (str, bytes))
              and v and not isinstance(v, (Erased, ErasedBytes))}
    if not values:
        return None
    stack = [metadata]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += item
        elif isinstance(item, (str, bytes)) and item in values:
            return values[item]
    return None


def groups(fields: tuple[PersonalField, ...]) -> tuple[tuple[str, tuple[PersonalField, ...]], ...]:
    """The personal fields by subject field (sealed together), each group and its fields in declaration order."""
    by_subject: dict[str, list[PersonalField]] = {}
    for field in fields:
        by_subject.setdefault(field.subject, []).append(field)
    return tuple((subject, tuple(group)) for subject, group in by_subject.items())


def _kind(hint: Any, where: str) -> str:
    if hint is str:
        return STR
    if hint is bytes:
        return BYTES
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        return OPTIONAL
    raise TypeError(f"{where}: a personal field must be str, bytes or optional (X | None), "
                    f"the types with an erased value (store/codec/personal.py); got {hint!r}")


def subject_id(value: object, where: str) -> str:
    """The subject id held by a subject field (a str, an int or a UUID), as text; InvalidEvent otherwise."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, uuid.UUID) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise errors.InvalidEvent(f"{where}: a subject id must be a non-empty str, an int or a UUID, "
                              f"got {type(value).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class SubjectForgotten:
    """Appended to stream ``subject-<subject>`` when a subject is forgotten (``store.forget``): its data key is
    gone, and its personal fields decode to their erased values from then on. Every registry knows it."""

    subject: str


#: The stream a subject's ``SubjectForgotten`` event is appended to.
def forgotten_stream(subject: str) -> str:
    """``subject-<subject>``: the stream of a subject's ``SubjectForgotten`` event."""
    return f"subject-{subject}"

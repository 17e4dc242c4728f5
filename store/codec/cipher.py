"""The seat between the packed fields and the column: personal fields sealed with their subject's data key.

The ``eventsourcing`` library's Mapper composes a transcoder, a compressor and a cipher over a whole event.
Here only the personal fields are secret (type, version, stream, ids and every other field must stay
readable, so routing, partitions, lag and audits work without a key), so the cipher sits on the fields:
the personal values of one subject in one event (or snapshot) are packed together as a msgpack list and
sealed; their fields are left out of the map, and the sealed groups stored under the map's key ``""``
(``SEALED_KEY``, which no field can have) as a flat list of three binaries per group (``Group``): its head
(the subject, the kinds and the names of its fields), the nonce and the ciphertext:

- AES-256-GCM with the subject's data key and a random 96-bit nonce per group;
- associated data binding the ciphertext to its event id (or the snapshot), its stream and its head, so a
  group copied into another event or stream, or given other fields, another subject or other kinds, does
  not open (``CorruptEvent``);
- each field's kind (``personal.STR``, ``BYTES``, ``OPTIONAL``) says which erased value it reads back as
  once the key is gone (``personal.ERASED_VALUES``); a group with an empty nonce and ciphertext holds values
  sealed for a subject already forgotten at append (or erased values appended again): nothing was stored.

One group per subject and event rather than per field: an event's personal fields are erased together
anyway, and each group costs a decryption and a few microseconds of Python on every read. The layout is
the one that reads fastest (bench/personal.py): msgpack makes the three binaries itself, so opening a group
slices nothing, and the head is its own cache key.

Events and snapshots stored before that layout (the first one, ``Sealed``: each group as msgpack ext type 5
under the first of its fields, its head, nonce and ciphertext in one body; ``open_fields``) read as ever.

A whole-body transformer (a compressor) would sit in ``Registry.encode``/``decode`` after the map is packed;
this one needs the fields, so the registry runs it on the map.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from store import errors
from store.codec import personal, wire

#: The map key of the sealed groups (no dataclass field is named ``""``).
SEALED_KEY = ""
#: The ext type of a group sealed in the first layout (``Sealed``), read but no longer written.
EXT_SEALED = 5
_NONCE_BYTES = 12
_AAD_PREFIX = b"eventfleet/personal/v1\x00"
_EVENT_AAD = _AAD_PREFIX + b"event\x00"
_AAD_PREFIX_2 = b"eventfleet/personal/v2\x00"
_EVENT_AAD_2 = _AAD_PREFIX_2 + b"event\x00"
_SNAPSHOT_AAD_2 = _AAD_PREFIX_2 + b"snapshot\x00"


class Sealed(bytes):
    """The personal values of one subject in one event (or snapshot) as the first layout stored them, under
    the first of their fields (the others are left out of the map); the ext 5 body, opened by
    ``Cipher.open_fields``:

    - 2 bytes (big-endian): the length of the head, then the head:
      - 1 byte: n, the number of fields sealed together, then n bytes: their kinds (``personal.STR``, ...);
      - 2 bytes (big-endian): the subject's length, then its UTF-8;
      - for each field but the first (whose name is the map's key): 1 byte, its name's length, then its name;
    - the nonce (12 bytes) and the ciphertext of the values' msgpack list, in that order; or nothing, for
      values sealed for a subject forgotten at append (or erased values appended again): nothing stored.

    The head repeats across a subject's events of one class, so its parse is remembered (``_heads``).
    """

    __slots__ = ()

    def head(self) -> tuple[bytes, Head]:
        """The head's bytes and what they say; CorruptEvent when malformed."""
        end = 2 + ((self[0] << 8) | self[1]) if len(self) >= 2 else 0
        raw = self[2:end]
        found = _heads.get(raw)
        if found is None:
            if end == 0 or end > len(self):
                raise errors.CorruptEvent("malformed sealed personal value")
            found = _parse_head(raw)
            if len(_heads) >= 4096:  # bounded: a head per subject and class met lately
                _heads.clear()
            _heads[raw] = found
        return raw, found

    @property
    def subject(self) -> str:
        """The subject id the values belong to."""
        return self.head()[1][0]


#: What a head says: the subject, the fields' kinds, the names of the fields but the first.
Head = tuple[str, tuple[str, ...], tuple[str, ...]]
_heads: dict[bytes, Head] = {}


def _parse_head(raw: bytes) -> Head:
    try:
        n = raw[0]
        kinds = tuple(_KIND_OF[k] for k in raw[1:1 + n])
        at = 1 + n
        size = (raw[at] << 8) | raw[at + 1]
        subject = raw[at + 2:at + 2 + size].decode()
        at += 2 + size
        others = []
        for _ in range(n - 1):
            others.append(raw[at + 1:at + 1 + raw[at]].decode())
            at += 1 + raw[at]
    except (IndexError, KeyError, UnicodeDecodeError) as exc:
        raise errors.CorruptEvent("malformed sealed personal value") from exc
    if n == 0 or len(kinds) != n or at != len(raw) or len(subject.encode()) != size or len(others) != n - 1:
        raise errors.CorruptEvent("malformed sealed personal value")
    return subject, kinds, tuple(others)


_KIND_OF = {ord(kind): kind for kind in personal.ERASED_VALUES}  # by its byte in a body
wire.EXT_HOOKS[EXT_SEALED] = Sealed
_ERASED_TYPES = frozenset({personal.Erased, personal.ErasedBytes})
# An erased value among real ones of a group reads back erased too.
_ERASED_MARKS: dict[type[Any], msgpack.ExtType] = {
    personal.Erased: msgpack.ExtType(personal.EXT_ERASED, personal.STR.encode()),
    personal.ErasedBytes: msgpack.ExtType(personal.EXT_ERASED, personal.BYTES.encode())}


def _erased(body: bytes) -> Any:
    if len(body) != 1 or body[0] not in _KIND_OF:
        raise errors.CorruptEvent("malformed erased value")
    return personal.ERASED_VALUES[_KIND_OF[body[0]]]


wire.EXT_HOOKS[personal.EXT_ERASED] = _erased


def sealed_subjects(datas: Iterable[bytes]) -> list[str]:
    """The subjects of the sealed groups in stored maps (corrupt data is left for its decoder to report).
    Only the maps whose bytes may hold sealed groups are decoded (``_MAYBE_SEALED``: false positives cost a
    decode)."""
    found: list[str] = []
    for data in datas:
        if not isinstance(data, bytes) or _MAYBE_SEALED.search(data) is None:
            continue
        try:
            fields = wire.unpackb(data)
            if not isinstance(fields, dict):
                continue
            found += [v.subject for v in fields.values() if type(v) is Sealed]
            if SEALED_KEY in fields:
                found += group_subjects(fields[SEALED_KEY])
        except errors.CodecError:
            continue
    return found


#: The msgpack bytes that may start sealed groups: the key ``""`` and an array (fixarray or array 16), or
#: the headers an ext 5 can have (ext 8/16/32 with their lengths, or a fixext of 8 or 16 bytes).
_MAYBE_SEALED = re.compile(rb"\xa0[\x90-\x9f\xdc]|\xc7.\x05|\xc8..\x05|\xc9....\x05|[\xd7\xd8]\x05", re.DOTALL)

#: What a head says, by its bytes: the subject, the fields' kinds and names (``_read_head``).
Group = tuple[str, tuple[str, ...], tuple[str, ...]]
_groups: dict[bytes, Group] = {}


def _read_head(head: bytes) -> Group:
    """What a group's head says, remembered; CorruptEvent when malformed. Its layout: 1 byte, n, the number
    of fields; n bytes, their kinds; 2 bytes (big-endian), the subject's length, then its UTF-8; for each
    field, 1 byte, its name's length, then its name."""
    found = _groups.get(head)
    if found is not None:
        return found
    try:
        n = head[0]
        kinds = tuple(_KIND_OF[k] for k in head[1:1 + n])
        at = 1 + n
        size = (head[at] << 8) | head[at + 1]
        subject = head[at + 2:at + 2 + size].decode()
        at += 2 + size
        names = []
        for _ in range(n):
            names.append(head[at + 1:at + 1 + head[at]].decode())
            at += 1 + head[at]
    except (IndexError, KeyError, UnicodeDecodeError) as exc:
        raise errors.CorruptEvent("malformed sealed personal value") from exc
    if n == 0 or at != len(head) or len(subject.encode()) != size or len(set(names)) != n \
            or SEALED_KEY in names:
        raise errors.CorruptEvent("malformed sealed personal value")
    if len(_groups) >= 4096:  # bounded: a head per subject and class met lately
        _groups.clear()
    _groups[bytes(head)] = found = (subject, kinds, tuple(names))
    return found


def group_subjects(groups: Any) -> list[str]:
    """The subjects of sealed groups (the value under ``SEALED_KEY``); CorruptEvent when it is not a list of
    groups (three binaries each, the first a head)."""
    if type(groups) is not list or not groups or len(groups) % 3 or any(type(part) is not bytes for part in groups):
        raise errors.CorruptEvent("malformed sealed personal values")
    return [_read_head(head)[0] for head in groups[::3]]


#: Heads made, by (subject, id of the group): a subject's events of one class share one.
_made_heads: dict[tuple[str, int], tuple[tuple[personal.PersonalField, ...], bytes]] = {}


def _make_head(subject: str, group: tuple[personal.PersonalField, ...]) -> bytes:
    raw = subject.encode()
    if len(raw) > 65535:
        raise errors.InvalidEvent(f"a subject id must be at most 65535 bytes of UTF-8, got {len(raw)}")
    head = bytes([len(group), *(ord(f.kind) for f in group)]) + len(raw).to_bytes(2, "big") + raw
    for field in group:
        head += bytes([len(field.name.encode())]) + field.name.encode()
    if len(_made_heads) >= 4096:  # bounded, as _groups
        _made_heads.clear()
    _made_heads[(subject, id(group))] = (group, head)
    return head


class _Nonces(threading.local):
    """Random 96-bit nonces, drawn from the OS 4 KiB at a time (a system call per value costs as much as
    the encryption). A forked child drops what its parent drew: a nonce must never repeat under one key."""

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0

    def next(self) -> bytes:
        if self.at + _NONCE_BYTES > len(self.pool):
            self.pool, self.at = os.urandom(4096 - 4096 % _NONCE_BYTES), 0
        self.at += _NONCE_BYTES
        return self.pool[self.at - _NONCE_BYTES:self.at]


_nonces = _Nonces()


def _forget_nonces() -> None:
    _nonces.pool, _nonces.at = b"", 0


os.register_at_fork(after_in_child=_forget_nonces)


class Keyring(Protocol):
    """The subjects' data keys, as the codec needs them: synchronously."""

    def key(self, subject: str) -> AESGCM | None:
        """The subject's data key for sealing and opening; None when the subject is forgotten. Raises
        ``SubjectKeyNotLoaded`` when this process has not loaded it (the store loads it and asks again)."""
        ...

    def preload(self, subjects: Sequence[str]) -> None:
        """Load the keys of subjects not loaded yet, at once where the keyring can (a batch about to be decoded)."""
        ...


def event_aad(event_id: uuid.UUID, stream_id: str) -> bytes:
    """The associated data of an event's sealed groups (each group's head is appended)."""
    return b"".join((_EVENT_AAD_2, event_id.bytes, b"\x00", stream_id.encode(), b"\x00"))


def snapshot_aad(stream_id: str) -> bytes:
    """The associated data of a snapshot's sealed groups (each group's head is appended)."""
    return b"".join((_SNAPSHOT_AAD_2, stream_id.encode(), b"\x00"))


def _first_layout_aad(origin: tuple[uuid.UUID | None, str]) -> bytes:
    """The associated data of a map's groups in the first layout (its field's name and head are appended)."""
    event_id, stream_id = origin
    if event_id is None:
        return b"%ssnapshot\x00%s\x00" % (_AAD_PREFIX, stream_id.encode())
    return _EVENT_AAD + event_id.bytes + b"\x00" + stream_id.encode() + b"\x00"


_CANNOT_OPEN = "a personal value does not authenticate (tampered with, or moved from another event or stream)"


@dataclasses.dataclass(frozen=True, slots=True)
class Cipher:
    """Seals and opens personal values with the data keys of ``keyring``."""

    keyring: Keyring

    def seal(self, subject: str, group: tuple[personal.PersonalField, ...], values: list[Any],
             aad: bytes) -> tuple[bytes, bytes, bytes]:
        """The stored form of a subject's personal values in one event (those of group's fields, in order):
        its head, nonce and ciphertext; an empty nonce and ciphertext when the subject is forgotten, or all
        values are erased (a handler copying them on). One nonce and one ciphertext for the group: the
        fields' names and kinds are in the head, which is associated data, so a value cannot move to another
        field either. aad: ``event_aad`` or ``snapshot_aad`` of where it is stored."""
        found = _made_heads.get((subject, id(group)))
        head = found[1] if found is not None and found[0] is group else _make_head(subject, group)
        key = self.keyring.key(subject)
        if key is None or (not _ERASED_TYPES.isdisjoint(map(type, values))
                           and all(type(v) in _ERASED_TYPES for v in values)):
            return head, b"", b""
        nonce = _nonces.next()
        plain = wire.packb([_ERASED_MARKS.get(type(v), v) for v in values])
        return head, nonce, key.encrypt(nonce, plain, aad + head)

    def open_groups(self, fields: dict[str, Any], origin: tuple[uuid.UUID | None, str], groups: Any) -> None:
        """Put the values of sealed groups (the list under ``SEALED_KEY``, taken out of fields) of a map stored
        at origin (event id and stream; None and stream for a snapshot) into it, or their erased values when
        their subject is forgotten; CorruptEvent when one does not authenticate (tampered with, or moved
        from another event or stream) or is malformed. The hot path of every read: per group, one lookup of
        its head, one of its key, one decryption and one unpacking."""
        try:
            count = len(groups) if type(groups) is list else 0
            if count == 0 or count % 3:
                raise errors.CorruptEvent("malformed sealed personal values")
            base = None
            for at in range(0, count, 3):
                head, nonce, sealed = groups[at], groups[at + 1], groups[at + 2]
                group = _groups.get(head)
                if group is None:
                    group = _read_head(head)
                subject, kinds, names = group
                key = self.keyring.key(subject) if nonce else None
                if key is None:
                    for name, kind in zip(names, kinds, strict=True):
                        fields[name] = personal.ERASED_VALUES[kind]
                    continue
                if base is None:
                    event_id, stream_id = origin
                    base = (b"".join((_EVENT_AAD_2, event_id.bytes, b"\x00", stream_id.encode(), b"\x00"))
                            if event_id is not None else snapshot_aad(stream_id))
                values = msgpack.unpackb(key.decrypt(nonce, sealed, base + head), ext_hook=wire.ext_hook)
                if type(values) is not list or len(values) != len(names):
                    raise errors.CorruptEvent("a sealed group of personal values holds another number of values")
                if len(names) == 2:
                    fields[names[0]], fields[names[1]] = values
                else:
                    for name, value in zip(names, values, strict=True):
                        fields[name] = value
        except InvalidTag as exc:
            raise errors.CorruptEvent(_CANNOT_OPEN) from exc
        except errors.EventFleetError:
            raise
        except Exception as exc:  # a head or nonce of another type, or msgpack's many errors
            raise errors.CorruptEvent(f"a sealed personal value cannot be read: {type(exc).__name__}") from exc

    def open_fields(self, fields: dict[str, Any], origin: tuple[uuid.UUID | None, str], names: list[str]) -> None:
        """Put back the values of groups sealed in the first layout (``Sealed``) under names in a decoded map
        stored at origin, or their erased values when their subject is forgotten; CorruptEvent when one does
        not authenticate (tampered with, or moved from another event, stream or field)."""
        aad = _first_layout_aad(origin)
        for name in names:
            sealed = fields[name]
            end = 2 + ((sealed[0] << 8) | sealed[1]) if len(sealed) >= 2 else 0
            head = _heads.get(sealed[2:end]) or sealed.head()[1]
            subject, kinds, others = head
            key = self.keyring.key(subject) if end < len(sealed) else None
            if key is None:
                fields[name] = personal.ERASED_VALUES[kinds[0]]
                for field, kind in zip(others, kinds[1:], strict=True):
                    fields[field] = personal.ERASED_VALUES[kind]
                continue
            try:
                values = msgpack.unpackb(key.decrypt(sealed[end:end + _NONCE_BYTES], sealed[end + _NONCE_BYTES:],
                                                     aad + name.encode() + sealed[:end]),
                                         ext_hook=wire.ext_hook, raw=False, timestamp=0)
            except InvalidTag as exc:
                raise errors.CorruptEvent("a personal value does not authenticate (tampered with, or "
                                          "moved from another event, stream or field)") from exc
            except errors.CodecError:
                raise
            except Exception as exc:  # a nonce cut short (ValueError), or msgpack's many errors
                raise errors.CorruptEvent(f"a sealed personal value cannot be read: {type(exc).__name__}") from exc
            if type(values) is not list or len(values) != len(kinds):
                raise errors.CorruptEvent("a sealed group of personal values holds another number of values")
            fields[name] = values[0]
            for field, value in zip(others, values[1:], strict=True):
                fields[field] = value

"""The seat between a packed field and the column: personal fields sealed with their subject's data key.

The ``eventsourcing`` library's Mapper composes a transcoder, a compressor and a cipher over a whole event.
Here only the personal fields are secret (type, version, stream, ids and every other field must stay
readable, so routing, partitions, lag and audits work without a key), so the cipher sits per field: each
personal value is packed alone (``wire.packb``), sealed, and stored in the event's map as msgpack ext type
5 (``EXT_SEALED``), whose body is ``[subject, kind, nonce, ciphertext]``:

- AES-256-GCM with the subject's data key and a random 96-bit nonce per value;
- associated data binding the ciphertext to its event id (or the snapshot), stream and field name, so a
  sealed value copied into another event, stream or field does not open (``CorruptEvent``);
- ``kind`` (``personal.STR``, ``BYTES``, ``OPTIONAL``) says which erased value it reads back as once the
  key is gone (``personal.ERASED_VALUES``); an empty nonce is a value sealed for a subject already forgotten
  at append: nothing of it was stored.

A whole-body transformer (a compressor) would sit in ``Registry.encode``/``decode`` after the map is packed;
this one needs the fields, so the registry runs it on the map.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from store import errors
from store.codec import personal, wire

EXT_SEALED = 5
_NONCE_BYTES = 12
_AAD_PREFIX = b"eventfleet/personal/v1\x00"


@dataclasses.dataclass(frozen=True, slots=True)
class Sealed:
    """A personal value as stored: opened (or erased) by ``Cipher.open`` before the event is built."""

    subject: str
    kind: str
    nonce: bytes
    ciphertext: bytes


def unpack_sealed(data: bytes) -> Sealed:
    """The ext body of a sealed value; CorruptEvent when it is not one."""
    body = msgpack.unpackb(data)
    if not (isinstance(body, list) and len(body) == 4 and isinstance(body[0], str)
            and body[1] in personal.ERASED_VALUES and isinstance(body[2], bytes) and isinstance(body[3], bytes)):
        raise errors.CorruptEvent("malformed sealed personal value")
    return Sealed(*body)


wire.EXT_HOOKS[EXT_SEALED] = unpack_sealed


def sealed_subjects(datas: Iterable[bytes]) -> list[str]:
    """The subjects of the sealed values in stored maps (corrupt data is left for its decoder to report)."""
    found: list[str] = []
    for data in datas:
        try:
            fields = wire.unpackb(data)
        except errors.CodecError:
            continue
        if isinstance(fields, dict):
            found += [v.subject for v in fields.values() if type(v) is Sealed]
    return found


class Keyring(Protocol):
    """The subjects' data keys, as the codec needs them: synchronously."""

    def key(self, subject: str) -> AESGCM | None:
        """The subject's data key for sealing and opening; None when the subject is forgotten. Raises
        ``SubjectKeyNotLoaded`` when this process has not loaded it (the store loads it and asks again)."""
        ...


def event_aad(event_id: uuid.UUID, stream_id: str) -> bytes:
    """The associated data of an event's sealed values (the field name is appended per value)."""
    return b"%sevent\x00%s\x00%s\x00" % (_AAD_PREFIX, event_id.bytes, stream_id.encode())


def snapshot_aad(stream_id: str) -> bytes:
    """The associated data of a snapshot's sealed values (the field name is appended per value)."""
    return b"%ssnapshot\x00%s\x00" % (_AAD_PREFIX, stream_id.encode())


@dataclasses.dataclass(frozen=True, slots=True)
class Cipher:
    """Seals and opens personal values with the data keys of ``keyring``."""

    keyring: Keyring

    def seal(self, subject: str, kind: str, value: Any, aad: bytes) -> msgpack.ExtType:
        """The stored form of a personal value of subject (nothing of it when the subject is forgotten)."""
        key = self.keyring.key(subject)
        if key is None:
            body = [subject, kind, b"", b""]
        else:
            nonce = os.urandom(_NONCE_BYTES)
            body = [subject, kind, nonce, key.encrypt(nonce, wire.packb(value), aad)]
        return msgpack.ExtType(EXT_SEALED, wire.packb(body))

    def open(self, sealed: Sealed, aad: bytes) -> Any:
        """The value sealed, or its erased value when its subject is forgotten; CorruptEvent when the
        ciphertext does not authenticate (tampered with, or moved from another event, stream or field)."""
        if not sealed.nonce:
            return personal.ERASED_VALUES[sealed.kind]
        key = self.keyring.key(sealed.subject)
        if key is None:
            return personal.ERASED_VALUES[sealed.kind]
        try:
            plain = key.decrypt(sealed.nonce, sealed.ciphertext, aad)
        except InvalidTag as exc:
            raise errors.CorruptEvent("a personal value does not authenticate (tampered with, or moved "
                                      "from another event, stream or field)") from exc
        return wire.unpackb(plain)

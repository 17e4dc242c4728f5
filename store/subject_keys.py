"""Subjects' data keys: wrapped by the deployment's key-encryption keys, created on first use, cached.

- ``KeyEncryptionKeys``: the KEKs a deployment supplies (``EVENTFLEET_KEK`` or ``EVENTFLEET_KEK_FILE``), by
  id; the newest wraps, every one unwraps, so a KEK is rotated by adding a newer one, running
  ``eventfleet rewrap-keys`` (``EventStore.rewrap_keys``), then removing the old one.
- ``SubjectKeys``: the codec's ``Keyring`` over a ``KeyTable`` (the ``subject_keys`` table, or a dict in
  memory): ``ensure`` before an append (creating missing keys), ``load`` before a read, ``key`` in between,
  from a bounded per-process cache of unwrapped keys. A live key is cached for ``ttl`` seconds, so a process
  that cached it stops using it at most that long after another process forgot its subject (at once in the
  process that forgot it); "forgotten" is cached for good (forgetting is final: the tombstone stays).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import enum
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from store import errors

ENV_KEK = "EVENTFLEET_KEK"
ENV_KEK_FILE = "EVENTFLEET_KEK_FILE"
#: Seconds a process keeps using a cached live data key (see the module's docstring).
DEFAULT_TTL = 60.0
#: Unwrapped data keys a process keeps at most (a few hundred bytes each).
DEFAULT_CACHE_SIZE = 100_000
_WRAP_AAD = b"eventfleet/subject-key/v1\x00"
_NONCE_BYTES = 12

T = TypeVar("T")
#: A subject's stored key: (kek_id, wrapped key), both None once the subject is forgotten.
StoredKey = tuple[str | None, bytes | None]
#: Set while a caller that loads keys itself decodes: a missing key raises instead of blocking (see ``key``).
_DEFERRING: contextvars.ContextVar[bool] = contextvars.ContextVar("eventfleet_keys_deferring", default=False)
#: Set during a dry run (``encode_with_keys``): the subjects met without a cached key, which get a throwaway one.
_MISSING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("eventfleet_keys_missing", default=None)
_THROWAWAY = AESGCM(bytes(32))
#: Set while encoding or decoding inside a caller's transaction: the keys read (or created) in it, not cached.
_PROVISIONAL: contextvars.ContextVar[Mapping[str, AESGCM | None] | None] = contextvars.ContextVar(
    "eventfleet_keys_provisional", default=None)


class FromEnv(enum.Enum):
    """The type of ``FROM_ENV``."""

    FROM_ENV = "from_env"


#: A store's default KEKs: ``KeyEncryptionKeys.from_env()`` when the store is made.
FROM_ENV: Literal[FromEnv.FROM_ENV] = FromEnv.FROM_ENV


class KeyEncryptionKeys:
    """The deployment's key-encryption keys by id, in order: the last one is the newest and wraps."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise errors.KeyEncryptionKeyMissing()
        self._keys = {kek_id: AESGCM(key) for kek_id, key in keys.items()}
        self.newest = list(keys)[-1]

    def __repr__(self) -> str:
        return f"KeyEncryptionKeys(ids={list(self._keys)!r})"  # never the keys

    @classmethod
    def parse(cls, text: str, source: str) -> KeyEncryptionKeys:
        """KEKs written as entries ``ID:BASE64`` (or a bare ``BASE64``, whose id is ``k`` and the first 12 hex
        digits of its SHA-256), separated by commas or newlines, oldest first; ``#`` starts a comment line.
        ConfigError, naming source, for anything else or a key that is not 32 bytes."""
        keys: dict[str, bytes] = {}
        for raw in text.replace(",", "\n").splitlines():
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            kek_id, sep, encoded = entry.rpartition(":")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != 32 or (sep and not kek_id):
                raise errors.ConfigError(f"{source}: each key-encryption key must be base64 of 32 bytes, "
                                         f"optionally after an id and a colon (ID:BASE64)")
            kek_id = kek_id or "k" + hashlib.sha256(key).hexdigest()[:12]
            keys.pop(kek_id, None)  # a repeated id: the later entry, and its place, win
            keys[kek_id] = key
        if not keys:
            raise errors.ConfigError(f"{source} holds no key-encryption key")
        return cls(keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KeyEncryptionKeys | None:
        """The KEKs of ``EVENTFLEET_KEK`` or the file ``EVENTFLEET_KEK_FILE`` names; None when neither is set."""
        text, path = environ.get(ENV_KEK), environ.get(ENV_KEK_FILE)
        if text and path:
            raise errors.ConfigError(f"set {ENV_KEK} or {ENV_KEK_FILE}, not both")
        if path:
            try:
                with open(path, encoding="utf-8") as file:
                    return cls.parse(file.read(), ENV_KEK_FILE)
            except OSError as exc:
                raise errors.ConfigError(f"{ENV_KEK_FILE}: cannot read {path}: {exc.strerror}") from exc
        return cls.parse(text, ENV_KEK) if text else None

    def wrap(self, subject: str, data_key: bytes) -> tuple[str, bytes]:
        """(newest KEK id, data_key wrapped by it for subject)."""
        nonce = os.urandom(_NONCE_BYTES)
        return self.newest, nonce + self._keys[self.newest].encrypt(nonce, data_key, _WRAP_AAD + subject.encode())

    def unwrap(self, subject: str, kek_id: str, wrapped: bytes) -> bytes:
        """The data key of subject wrapped by KEK kek_id; KeyEncryptionKeyMismatch when it is not configured
        or is not the key it was wrapped with."""
        kek = self._keys.get(kek_id)
        if kek is None:
            raise errors.KeyEncryptionKeyMismatch(
                f"subject keys are wrapped by key-encryption key {kek_id!r}, which neither {ENV_KEK} nor "
                f"{ENV_KEK_FILE} holds")
        try:
            return kek.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], _WRAP_AAD + subject.encode())
        except InvalidTag as exc:
            raise errors.KeyEncryptionKeyMismatch(
                f"a subject key does not unwrap with key-encryption key {kek_id!r}: {ENV_KEK} or "
                f"{ENV_KEK_FILE} holds another key under that id") from exc


def resolve(keks: KeyEncryptionKeys | FromEnv | None) -> KeyEncryptionKeys | None:
    """The KEKs a store was given, the environment's for ``FROM_ENV``."""
    return KeyEncryptionKeys.from_env() if keks is FROM_ENV else keks


class KeyTable(Protocol):
    """Where subjects' wrapped keys are kept (the ``subject_keys`` table, or memory)."""

    async def fetch(self, subjects: list[str], conn: Any = None) -> dict[str, StoredKey]:
        """The stored keys of those subjects that have a row (read on conn, the caller's, if given)."""
        ...

    async def create(self, rows: list[tuple[str, str, bytes]], conn: Any = None) -> None:
        """Store (subject, kek_id, wrapped key) rows for subjects without one; others are left as they are
        (written on conn, in the caller's transaction, if given; else committed at once)."""
        ...


class SubjectKeys:
    """The subjects' data keys as the codec needs them (``codec.Keyring``), cached per process."""

    def __init__(self, table: KeyTable, keks: KeyEncryptionKeys | None, *, ttl: float = DEFAULT_TTL,
                 cache_size: int = DEFAULT_CACHE_SIZE,
                 blocking_fetch: Callable[[list[str]], dict[str, StoredKey]] | None = None) -> None:
        self.table = table
        self.keks = keks
        self.ttl = ttl
        self.cache_size = cache_size
        #: How ``key`` loads a key it lacks when no caller loaded it first (a worker decoding a delivery:
        #: store/event_store.py); None: it raises SubjectKeyNotLoaded.
        self.blocking_fetch = blocking_fetch
        self._cache: dict[str, tuple[AESGCM | None, float]] = {}

    def key(self, subject: str) -> AESGCM | None:
        """The subject's data key (None: forgotten); SubjectKeyNotLoaded when not cached and not fetchable."""
        found = self._cache.get(subject)
        if found is not None and found[1] > time.monotonic():
            return found[0]
        provisional = _PROVISIONAL.get()
        if provisional is not None and subject in provisional:
            return provisional[subject]
        missing = _MISSING.get()
        if missing is not None:
            missing.append(subject)
            return _THROWAWAY
        if self.blocking_fetch is None or _DEFERRING.get():
            raise errors.SubjectKeyNotLoaded(frozenset([subject]))
        self._remember(self.blocking_fetch([subject]), [subject])
        return self._cache[subject][0]

    async def encode_with_keys(self, encode: Callable[[], T], conn: Any = None) -> T:
        """``encode()`` (an append's or a snapshot's encoding, which checks everything), with the keys of the
        subjects it seals for loaded or created first when any is not cached. It runs once when all are
        (the usual case); else once dry, with throwaway keys for the subjects missing, so a refused event is
        refused before any I/O, then again once their keys are at hand. With conn (an append inside the
        caller's transaction), keys are read and created on it (``provide``)."""
        missing: list[str] = []
        token = _MISSING.set(missing)
        try:
            encoded = encode()
        finally:
            _MISSING.reset(token)
        if not missing:
            return encoded
        if conn is None:
            await self.ensure(missing)
            return encode()
        with self.provisional(await self.provide(missing, conn, create=True)):
            return encode()

    async def provide(self, subjects: Iterable[str], conn: Any, *, create: bool) -> dict[str, AESGCM | None]:
        """The keys of subjects read (and, with create, created) in the caller's transaction on conn, for use
        within ``provisional``. Nothing is cached: the transaction may roll back, or hold rows of its own not
        committed yet, and a key cached from it could differ from the one that commits. On conn, because a
        caller inside a transaction must not wait for a second connection of a pool it may have exhausted."""
        wanted = list(dict.fromkeys(subjects))
        stored = await self.table.fetch(wanted, conn)
        absent = [s for s in wanted if s not in stored]
        if create and absent:
            keks = self._keks()
            await self.table.create([(s, *keks.wrap(s, AESGCM.generate_key(bit_length=256))) for s in absent], conn)
            stored.update(await self.table.fetch(absent, conn))
        return {s: self._unwrap(s, stored.get(s, (None, None))) for s in wanted}

    @staticmethod
    @contextlib.contextmanager
    def provisional(keys: Mapping[str, AESGCM | None]) -> Iterator[None]:
        """Within: ``key`` answers for these subjects with these keys (``provide``)."""
        token = _PROVISIONAL.set(keys)
        try:
            yield
        finally:
            _PROVISIONAL.reset(token)

    @staticmethod
    @contextlib.contextmanager
    def deferring() -> Iterator[None]:
        """Within: a key that is not cached raises SubjectKeyNotLoaded (the caller loads it, then decodes
        again) rather than being fetched blocking."""
        token = _DEFERRING.set(True)
        try:
            yield
        finally:
            _DEFERRING.reset(token)

    def preload(self, subjects: Sequence[str]) -> None:
        """Fetch the keys of those subjects not cached in one blocking round trip (a batch a caller is about
        to decode on its own), unless the caller loads keys itself (``deferring``)."""
        wanted = self.missing(subjects)
        if wanted and self.blocking_fetch is not None and not _DEFERRING.get():
            self._remember(self.blocking_fetch(wanted), wanted)

    def missing(self, subjects: Iterable[str]) -> list[str]:
        """Those of subjects whose key is not cached (or has expired)."""
        now = time.monotonic()
        return [s for s in dict.fromkeys(subjects) if (found := self._cache.get(s)) is None or found[1] <= now]

    async def load(self, subjects: Iterable[str]) -> None:
        """Cache the keys of subjects (for reading): a subject without a key reads as forgotten."""
        wanted = self.missing(subjects)
        if wanted:
            self._remember(await self.table.fetch(wanted), wanted)

    async def ensure(self, subjects: Iterable[str]) -> None:
        """Cache the keys of subjects (for appending), creating the missing ones (committed at once):
        KeyEncryptionKeyMissing when there is none to create or unwrap with."""
        wanted = self.missing(subjects)
        if not wanted:
            return
        stored = await self.table.fetch(wanted)
        absent = [s for s in wanted if s not in stored]
        if absent:
            keks = self._keks()
            await self.table.create([(s, *keks.wrap(s, AESGCM.generate_key(bit_length=256))) for s in absent])
            stored.update(await self.table.fetch(absent))
        self._remember(stored, wanted)

    def forgotten(self, subject: str) -> None:
        """Remember that subject is forgotten (by this process: at once, not after ``ttl``)."""
        self._put(subject, None, float("inf"))

    def _remember(self, stored: Mapping[str, StoredKey], wanted: list[str]) -> None:
        expires = time.monotonic() + self.ttl
        for subject in wanted:
            key = self._unwrap(subject, stored.get(subject, (None, None)))
            self._put(subject, key, expires if key is not None else float("inf"))

    def _unwrap(self, subject: str, stored: StoredKey) -> AESGCM | None:
        kek_id, wrapped = stored
        if kek_id is None or wrapped is None:
            return None  # forgotten (or never had one: nothing of it can be sealed)
        return AESGCM(self._keks().unwrap(subject, kek_id, wrapped))

    def _put(self, subject: str, key: AESGCM | None, expires: float) -> None:
        if len(self._cache) >= self.cache_size and subject not in self._cache:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[subject] = (key, expires)

    def require_keks(self) -> KeyEncryptionKeys:
        """The KEKs; KeyEncryptionKeyMissing when there are none."""
        return self._keks()

    def _keks(self) -> KeyEncryptionKeys:
        if self.keks is None:
            raise errors.KeyEncryptionKeyMissing()
        return self.keks


class MemoryKeyTable:
    """A ``KeyTable`` in a dict (the in-memory store's)."""

    def __init__(self) -> None:
        self.rows: dict[str, StoredKey] = {}

    async def fetch(self, subjects: list[str], conn: Any = None) -> dict[str, StoredKey]:
        return {s: self.rows[s] for s in subjects if s in self.rows}

    async def create(self, rows: list[tuple[str, str, bytes]], conn: Any = None) -> None:
        for subject, kek_id, wrapped in rows:
            self.rows.setdefault(subject, (kek_id, wrapped))

    def forget(self, subject: str) -> bool:
        """Delete subject's key, keeping its tombstone; whether it was not forgotten before."""
        first = self.rows.get(subject, ("", b""))[1] is not None
        self.rows[subject] = (None, None)
        return first

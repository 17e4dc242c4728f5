"""Settings read once from the EVENTFLEET_* environment variables (docs/reference.md)."""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import overload

from store import errors, names
from store.subject_keys import KeyEncryptionKeys
from workers.errors import LimitsConflict
from workers.runtime import redact

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: A role's HTTP port when EVENTFLEET_HTTP_PORT is not set.
DEFAULT_HTTP_PORTS = {"worker": 9108, "relay": 9109}
#: Ports after a role's default a process tries when the default is taken (several processes on one host).
NEXT_FREE_PORTS = 20
MIB = 1024 * 1024
#: The broker's largest message by default: RabbitMQ 4.x's ``max_message_size`` (3.x allowed 128 MiB). The
#: one place the broker's limit is known; EVENTFLEET_BROKER_MAX_MESSAGE_BYTES overrides it.
BROKER_MAX_MESSAGE_BYTES = 16 * MIB
#: What a batch message holds besides its events' data and metadata, at most, when it holds one event: the
#: map's keys, ids and positions (about 200 bytes), the stream id (255 characters) and the type name.
ENVELOPE_BYTES = 64 * 1024
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


#: Every environment variable: name, default, meaning (``eventfleet --help`` and the reference print it).
ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL, "PostgreSQL DSN"),
    ("EVENTFLEET_AMQP_URL", DEFAULT_AMQP_URL, "RabbitMQ URL, or comma-separated URLs of a cluster's nodes"),
    ("EVENTFLEET_SCHEMA", "eventfleet", "Postgres schema of the store, checkpoints and read models"),
    ("EVENTFLEET_PREFIX", "eventfleet", "prefix of every RabbitMQ exchange and queue"),
    ("EVENTFLEET_PROJECTION_MODULES", "(none)", "comma-separated modules whose projections to load"),
    ("EVENTFLEET_PARTITIONS", "16", "partitions of a schema migrated now (fixed for the schema's life)"),
    ("EVENTFLEET_HTTP_PORT", "9108 worker, 9109 relay", "port of /metrics, /healthz, /readyz (0 = off)"),
    ("EVENTFLEET_LOG_FORMAT", "text", "text or json (one object per line)"),
    ("EVENTFLEET_PREFETCH", "500", "events a worker's partition channel may hold unacked (in whole messages)"),
    ("EVENTFLEET_PREFETCH_BYTES", "6291456", "bytes of messages a worker's partition channel may hold unacked, at most"),
    ("EVENTFLEET_BATCH_SIZE", "200", "events per worker transaction (whole messages, at least one)"),
    ("EVENTFLEET_RELAY_BATCH_SIZE", "1000", "outbox rows per relay transaction"),
    ("EVENTFLEET_RELAY_BATCH_BYTES", "16777216", "event bytes per relay transaction (the event reaching it included)"),
    ("EVENTFLEET_RELAY_POLL_MS", "1000", "the relay's poll when no NOTIFY arrives"),
    ("EVENTFLEET_STOP_TIMEOUT", "10", "seconds the batch in flight gets to commit at SIGTERM"),
    ("EVENTFLEET_MAX_PAYLOAD_BYTES", "1048576", "largest event (data + metadata) the store accepts"),
    ("EVENTFLEET_CATCHUP_THRESHOLD", "2000", "lag in events above which a worker reads the store (0 = never)"),
    ("EVENTFLEET_CATCHUP_BATCH_SIZE", "2000", "events per read of a catch-up"),
    ("EVENTFLEET_READ_BYTES", "4194304", "event bytes per read of a catch-up, backfill or rebuild (reaching event included)"),
    ("EVENTFLEET_DECODE_CACHE_BYTES", "16777216", "bytes of batch bodies a worker keeps decoded (0 = none)"),
    ("EVENTFLEET_MESSAGE_EVENTS", "100", "events per batch message the relay publishes to a partition"),
    ("EVENTFLEET_MESSAGE_BYTES", "1048576", "bytes per batch message, at most (an event bigger goes alone)"),
    ("EVENTFLEET_BROKER_MAX_MESSAGE_BYTES", "16777216", "the broker's max_message_size (RabbitMQ 4.x default)"),
    ("EVENTFLEET_EVENTS_EXCHANGE", "0", "1: the relay also publishes one message per event to PREFIX.events"),
    ("EVENTFLEET_GROUP", "(none)", "worker group: its P shared queues feed all its read models (none: P per read model)"),
    ("EVENTFLEET_LEASE_SECONDS", "15", "a worker's partition leases expire this long after its last heartbeat"),
    ("EVENTFLEET_PROGRESS_SECONDS", "60", "a worker's progress line per projection every N s (0 = off)"),
    ("EVENTFLEET_TRANSACTION_IDLE_SECONDS", "EVENTFLEET_LEASE_SECONDS/3",
     "Postgres ends a worker's transaction idle this long (its process frozen); the relay's gets 30 s more (0 = off)"),
    ("EVENTFLEET_LOCK_TIMEOUT_SECONDS", "EVENTFLEET_LEASE_SECONDS/3",
     "a worker's or relay's statement waiting this long for a lock fails and is retried (0 = off)"),
    ("EVENTFLEET_KEK", "(none)", "key-encryption keys of personal fields: base64 of 32 bytes, or ID:BASE64, ... newest last"),
    ("EVENTFLEET_KEK_FILE", "(none)", "a file holding what EVENTFLEET_KEK would (one entry a line); not both"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything a process needs to know about its environment."""

    database_url: str = DEFAULT_DATABASE_URL
    amqp_url: str = DEFAULT_AMQP_URL  # the first of amqp_urls
    schema: str = "eventfleet"
    prefix: str = "eventfleet"
    http_port: int | None = None  # None: the role's own default (DEFAULT_HTTP_PORTS)
    log_format: str = "text"
    # Not in the contract's env table: tuning knobs with safe defaults.
    prefetch: int = 500
    batch_size: int = 200
    relay_batch_size: int = 1000  # outbox rows per relay transaction (see BENCHMARKS.md)
    relay_poll_ms: int = 1000  # the relay's fallback poll when no NOTIFY arrives
    stop_timeout: float = 10.0
    max_payload_bytes: int = 1024 * 1024
    catchup_threshold: int = 2000  # lag (events) above which a worker reads the backlog from the store; 0 = never
    catchup_batch_size: int = 2000  # events per read_all batch of a catch-up
    #: Modules whose projections this process runs (EVENTFLEET_PROJECTION_MODULES, comma-separated).
    projection_modules: tuple[str, ...] = ()
    progress_seconds: int = 60  # a worker's INFO progress line per projection; 0 = none
    #: P for a schema migrated now (EVENTFLEET_PARTITIONS); None: the schema's own, or 16 for a new one.
    partitions: int | None = None
    message_events: int = 100  # events per batch message (EVENTFLEET_MESSAGE_EVENTS)
    message_bytes: int = 1024 * 1024  # bytes per batch message, about (EVENTFLEET_MESSAGE_BYTES)
    # The memory budgets, in bytes (check_limits says which combinations cannot all hold).
    relay_batch_bytes: int = 16 * 1024 * 1024  # event bytes per relay claim (EVENTFLEET_RELAY_BATCH_BYTES)
    prefetch_bytes: int = 6 * 1024 * 1024  # a partition channel's unacked messages (EVENTFLEET_PREFETCH_BYTES)
    read_bytes: int = 4 * 1024 * 1024  # event bytes per store read of a catch-up/rebuild (EVENTFLEET_READ_BYTES)
    decode_cache_bytes: int = 16 * 1024 * 1024  # bodies kept decoded per process (EVENTFLEET_DECODE_CACHE_BYTES)
    #: The broker's max_message_size (EVENTFLEET_BROKER_MAX_MESSAGE_BYTES): no message may be bigger.
    broker_max_message_bytes: int = BROKER_MAX_MESSAGE_BYTES
    events_exchange: bool = False  # the relay also feeds the per-event topic exchange (EVENTFLEET_EVENTS_EXCHANGE)
    lease_seconds: float = 15.0  # partition leases expire this long after the last heartbeat
    #: The worker group (EVENTFLEET_GROUP): its P shared queues feed every read model its workers run, each message
    #: decoded once and dispatched in-process (docs/reference.md 6.0); None: a queue per read model per partition.
    group: str | None = None
    #: Every RabbitMQ node's URL (EVENTFLEET_AMQP_URL, comma-separated), tried in turn; () = (amqp_url,).
    amqp_urls: tuple[str, ...] = ()
    #: Postgres ends a worker's transaction whose process sent nothing for this long (idle_in_transaction_
    #: session_timeout; 0 = never); None: a third of the lease (lifecycle.session_timeouts).
    transaction_idle_seconds: float | None = None
    #: A worker's or relay's statement waiting longer for a lock fails, to be retried (lock_timeout; 0 = never);
    #: None: a third of the lease.
    lock_timeout_seconds: float | None = None
    #: The key-encryption keys of personal fields (EVENTFLEET_KEK or EVENTFLEET_KEK_FILE); None: none.
    keks: KeyEncryptionKeys | None = None

    def __post_init__(self) -> None:
        if not self.amqp_urls:
            object.__setattr__(self, "amqp_urls", (self.amqp_url,))
        elif self.amqp_urls[0] != self.amqp_url:
            raise ValueError("Settings.amqp_url must be the first of Settings.amqp_urls (set both, or amqp_url alone)")

    @property
    def max_message_bytes(self) -> int:
        """The largest batch message the relay publishes (``max_message_bytes``), which the prefetch budget
        must hold; workers accept any body the broker delivers (``broker_max_message_bytes``)."""
        return max_message_bytes(self.max_payload_bytes, self.message_bytes)

    @property
    def prefetch_messages(self) -> int:
        """A partition channel's prefetch in messages: ``prefetch`` events of full batch messages (at least 2),
        but no more messages of the largest size than fit in ``prefetch_bytes`` (at least 1)."""
        by_events = max(2, -(-self.prefetch // self.message_events))
        return max(1, min(by_events, self.prefetch_bytes // self.max_message_bytes))

    def check_limits(self) -> None:
        """Refuse byte limits that cannot all hold; raise LimitsConflict naming the variables and a value that
        works. The relay and the worker call it at start-up (a claim or a read takes at least one event and a
        prefetch at least one message, so each budget must hold one of the largest)."""
        payload, largest = self.max_payload_bytes, self.max_message_bytes
        problems = []
        if largest > self.broker_max_message_bytes:
            fits = self.broker_max_message_bytes - ENVELOPE_BYTES
            problems.append(
                f"EVENTFLEET_MAX_PAYLOAD_BYTES={payload} and EVENTFLEET_MESSAGE_BYTES={self.message_bytes} make "
                f"messages of up to {largest} bytes, over the broker's EVENTFLEET_BROKER_MAX_MESSAGE_BYTES="
                f"{self.broker_max_message_bytes}: set both to at most {fits} (or raise the broker's "
                f"max_message_size and that variable to {largest})")
        if self.prefetch_bytes < largest:
            problems.append(f"EVENTFLEET_PREFETCH_BYTES={self.prefetch_bytes} cannot hold one message of up to "
                            f"{largest} bytes: set it to at least {largest}")
        if self.relay_batch_bytes < payload:
            problems.append(f"EVENTFLEET_RELAY_BATCH_BYTES={self.relay_batch_bytes} cannot hold one event of "
                            f"EVENTFLEET_MAX_PAYLOAD_BYTES={payload}: set it to at least {payload}")
        if self.read_bytes < payload:
            problems.append(f"EVENTFLEET_READ_BYTES={self.read_bytes} cannot hold one event of "
                            f"EVENTFLEET_MAX_PAYLOAD_BYTES={payload}: set it to at least {payload}")
        if problems:
            raise LimitsConflict("; ".join(problems))

    def __repr__(self) -> str:
        # The URLs carry passwords: a logged or printed Settings must not show any part of them.
        return redact.fields(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read and validate the EVENTFLEET_* variables; an invalid value names its variable."""

        def get(name: str, default: str) -> str:
            return environ.get(name, default)

        database_url = get("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL)
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise errors.ConfigError("EVENTFLEET_DATABASE_URL must be a postgresql:// URL")
        _check_url("EVENTFLEET_DATABASE_URL", database_url)
        amqp_urls = amqp_urls_of(get("EVENTFLEET_AMQP_URL", DEFAULT_AMQP_URL))
        schema = get("EVENTFLEET_SCHEMA", "eventfleet")
        try:
            names.identifier(schema, what="schema")
        except errors.InvalidName as exc:
            raise errors.ConfigError(f"EVENTFLEET_SCHEMA: {exc}") from exc
        prefix = get("EVENTFLEET_PREFIX", "eventfleet")
        try:
            names.prefix(prefix)
        except errors.InvalidName as exc:
            raise errors.ConfigError(f"EVENTFLEET_PREFIX: {exc}") from exc
        modules = tuple(m.strip() for m in get("EVENTFLEET_PROJECTION_MODULES", "").split(",") if m.strip())
        for module in modules:
            if not _MODULE.fullmatch(module):
                raise errors.ConfigError(f"EVENTFLEET_PROJECTION_MODULES: {module!r} is not a dotted module name")
        log_format = get("EVENTFLEET_LOG_FORMAT", "text")
        if log_format not in ("text", "json"):
            raise errors.ConfigError("EVENTFLEET_LOG_FORMAT must be 'text' or 'json'")
        group = get("EVENTFLEET_GROUP", "").strip() or None
        if group is not None:
            try:
                names.identifier(group, what="worker group")
            except errors.InvalidName as exc:
                raise errors.ConfigError(f"EVENTFLEET_GROUP: {exc}") from exc
        max_payload_bytes = _int(environ, "EVENTFLEET_MAX_PAYLOAD_BYTES", 1024 * 1024, 1024, 64 * 1024 * 1024)
        return cls(
            database_url=database_url,
            amqp_url=amqp_urls[0],
            amqp_urls=amqp_urls,
            schema=schema,
            prefix=prefix,
            http_port=_int(environ, "EVENTFLEET_HTTP_PORT", None, 0, 65535),
            log_format=log_format,
            prefetch=_int(environ, "EVENTFLEET_PREFETCH", 500, 1, 65535),
            batch_size=_int(environ, "EVENTFLEET_BATCH_SIZE", 200, 1, 10_000),
            relay_batch_size=_int(environ, "EVENTFLEET_RELAY_BATCH_SIZE", 1000, 1, 10_000),
            relay_poll_ms=_int(environ, "EVENTFLEET_RELAY_POLL_MS", 1000, 10, 600_000),
            stop_timeout=float(_int(environ, "EVENTFLEET_STOP_TIMEOUT", 10, 1, 3600)),
            max_payload_bytes=max_payload_bytes,
            catchup_threshold=_int(environ, "EVENTFLEET_CATCHUP_THRESHOLD", 2000, 0, 2**31 - 1),
            catchup_batch_size=_int(environ, "EVENTFLEET_CATCHUP_BATCH_SIZE", 2000, 1, 100_000),
            projection_modules=modules,
            progress_seconds=_int(environ, "EVENTFLEET_PROGRESS_SECONDS", 60, 0, 86_400),
            partitions=_int(environ, "EVENTFLEET_PARTITIONS", None, 1, 4096),
            message_events=_int(environ, "EVENTFLEET_MESSAGE_EVENTS", 100, 1, 10_000),
            message_bytes=_int(environ, "EVENTFLEET_MESSAGE_BYTES", 1024 * 1024, 1024, 2 * 1024 * 1024),
            relay_batch_bytes=_int(environ, "EVENTFLEET_RELAY_BATCH_BYTES", 16 * MIB, 1024, 1024 * MIB),
            prefetch_bytes=_int(environ, "EVENTFLEET_PREFETCH_BYTES", 6 * MIB, 1024, 1024 * MIB),
            read_bytes=_int(environ, "EVENTFLEET_READ_BYTES", 4 * MIB, 1024, 1024 * MIB),
            decode_cache_bytes=_int(environ, "EVENTFLEET_DECODE_CACHE_BYTES", 16 * MIB, 0, 1024 * MIB),
            broker_max_message_bytes=_int(environ, "EVENTFLEET_BROKER_MAX_MESSAGE_BYTES",
                                          BROKER_MAX_MESSAGE_BYTES, 64 * 1024, 512 * MIB),
            events_exchange=bool(_int(environ, "EVENTFLEET_EVENTS_EXCHANGE", 0, 0, 1)),
            lease_seconds=float(_int(environ, "EVENTFLEET_LEASE_SECONDS", 15, 3, 3600)),
            group=group,
            transaction_idle_seconds=_int(environ, "EVENTFLEET_TRANSACTION_IDLE_SECONDS", None, 0, 3600),
            lock_timeout_seconds=_int(environ, "EVENTFLEET_LOCK_TIMEOUT_SECONDS", None, 0, 3600),
            keks=KeyEncryptionKeys.from_env({"EVENTFLEET_KEK": get("EVENTFLEET_KEK", ""),
                                             "EVENTFLEET_KEK_FILE": get("EVENTFLEET_KEK_FILE", "")}),
        )

    def port(self, role: str) -> int:
        """The HTTP port of a process of ``role`` ("worker", "relay"): EVENTFLEET_HTTP_PORT, or the role's
        default, so a relay and a worker started side by side with no configuration do not collide."""
        return DEFAULT_HTTP_PORTS[role] if self.http_port is None else self.http_port

    @property
    def free_ports(self) -> int:
        """Ports after the role's default a process may move to when it is taken: none once
        EVENTFLEET_HTTP_PORT is set (that port is where it is scraped)."""
        return NEXT_FREE_PORTS if self.http_port is None else 0

    def with_projection_modules(self, *modules: str) -> Settings:
        """These settings with ``modules`` added to the projection modules (once each, in order)."""
        merged = tuple(dict.fromkeys((*self.projection_modules, *modules)))
        return dataclasses.replace(self, projection_modules=merged)


def max_message_bytes(max_payload_bytes: int, message_bytes: int) -> int:
    """The largest batch message body: a full message holds about ``message_bytes``, a bigger event goes alone
    (``workers.relay.publish.partition_batches``), with its envelope."""
    return max(max_payload_bytes, message_bytes) + ENVELOPE_BYTES


def amqp_urls_of(value: str) -> tuple[str, ...]:
    """The URLs of ``EVENTFLEET_AMQP_URL``: one, or several separated by commas (blanks around them ignored),
    each an ``amqp://`` or ``amqps://`` URL checked as ``_check_url`` does. Raises ConfigError."""
    urls = tuple(u.strip() for u in value.split(",") if u.strip())
    if not urls:
        raise errors.ConfigError("EVENTFLEET_AMQP_URL must be an amqp:// or amqps:// URL")
    for i, url in enumerate(urls):
        which = "EVENTFLEET_AMQP_URL" if len(urls) == 1 else f"EVENTFLEET_AMQP_URL (URL {i + 1} of {len(urls)})"
        if not url.startswith(("amqp://", "amqps://")):
            raise errors.ConfigError(f"{which} must be an amqp:// or amqps:// URL")
        _check_url(which, url)
    return urls


def _check_url(name: str, value: str) -> None:
    """Refuse a URL the drivers would misparse: their errors would echo part of the password.

    An unencoded '@' in the password is the common case: urllib splits the user info at the last '@' and the
    drivers at the first, so the password's tail becomes the host and the error a DNS one naming it."""
    if re.split(r"[/?#]", value.partition("://")[2], maxsplit=1)[0].count("@") > 1:
        # Never echo the value, nor say where the '@' is: both would show part of the password.
        raise errors.ConfigError(f"{name} has more than one '@' before the host: write each '@' of the user "
                                 "or password as %40 (percent-encode ':' as %3A and '/' as %2F too)")
    try:
        parts = urllib.parse.urlsplit(value)
        for host in parts.netloc.rpartition("@")[2].split(","):  # libpq allows host1:port1,host2:port2
            urllib.parse.urlsplit(f"//{host}").port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or "@" in parts.path:
        # Never echo the value: it holds the password.
        raise errors.ConfigError(f"{name} is not a valid URL: percent-encode '@', ':' and '/' in the password")


@overload
def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int: ...
@overload
def _int(environ: Mapping[str, str], name: str, default: None, low: int, high: int) -> int | None: ...
def _int(environ: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise errors.ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


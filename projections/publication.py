"""Publications: integration events for other services, in a contract of their own.

A publication is the third kind of subscriber, after read models and reactors: declared and registered like
them (a name, ``@handles`` per event class), run by the same workers (partition leases, queues, per-stream
checkpoints, parking, lag, pause, status). Each handler maps an internal event to a ``Public`` message: its
own type name and version, a body (JSON by default, which any language reads without our codec; msgpack as
an option) and headers; returning None publishes nothing for that event::

    @register
    class OrdersOut(Publication):
        name = "orders_out"

        @handles(OrderPlaced)
        def placed(self, event: RecordedEvent) -> Public:
            e: OrderPlaced = event.event
            return Public("orders.placed", 1, {"order_id": event.stream_id, "total": str(e.total)})

The envelope is CloudEvents 1.0 in the binary content mode of its RabbitMQ (AMQP 0-9-1) protocol binding,
as the ``cloudevents`` SDK writes it (``cloudevents.core.bindings.rabbitmq``): every attribute is a ``ce-``
header, ``datacontenttype`` is the message's ``content_type`` property and the body is the data alone
(docs/reference.md, "Integration events", lists every attribute and header). ``id`` is the event's id (one
message per event: a consumer de-duplicates on it), ``source`` names the deployment and the publication,
``subject`` the stream, ``type`` the public name and version (``orders.placed.v1``, also the routing key),
``time`` when the event was recorded; ``streamversion`` and ``position`` extensions give its version in
the stream and its place in the store, and the correlation and W3C trace context of its metadata travel as
``correlationid``, ``causationid``, ``traceparent`` and ``tracestate``.

Delivery. A batch's messages are mapped by its handlers, then published with publisher confirms last in the
transaction that moves the publication's checkpoints (``before_commit``: a batch whose mapping fails publishes
nothing), and the transaction commits only once every confirm is in: at least once, in
stream order (one consumer holds a partition at a time, and the checkpoint rows a batch claims are locked
until it commits). A mapping that raises is retried, then parked per ``policy`` like a projection's handler;
the broker failing (no confirm) is an outage: the batch is retried as a whole until it is published.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, LiteralString, Protocol

import msgpack
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from projections.base import Projection, Runtime
from store import correlation_ids, db, errors, tracing
from store.event_store import EventStore
from store.records import RecordedEvent

Format = Literal["json", "msgpack"]

#: The content types of the two body formats (the message's ``content_type``, CloudEvents' ``datacontenttype``).
CONTENT_TYPES: Mapping[str, str] = {"json": "application/json", "msgpack": "application/msgpack"}

#: The CloudEvents extension attributes a message carries (names: lowercase letters and digits, per the spec).
STREAM_VERSION, POSITION = "streamversion", "position"
CORRELATION_ID, CAUSATION_ID = "correlationid", "causationid"

_FORMAT = JSONFormat()


class PublishUnavailable(errors.TransientError):
    """The broker did not take a publication's messages (no connection, no confirm, a nack): the batch is
    retried as a whole until it is published, never parked."""


@dataclasses.dataclass(frozen=True, slots=True)
class Public:
    """What a publication's handler makes of one event: the public type name and version (the CloudEvents
    ``type`` is ``f"{type}.v{version}"``), the data (what JSON or msgpack writes, with decimals and ids as
    strings, times in ISO 8601 and dataclasses as their fields; bytes as they are) and extra
    AMQP headers (strings; names starting ``ce-`` are the envelope's own and refused)."""

    type: str
    version: int = 1
    data: Any = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return f"{self.type}.v{self.version}"


@dataclasses.dataclass(frozen=True, slots=True)
class Outgoing:
    """One message as it goes to the exchange: routing key, AMQP properties and body."""

    routing_key: str
    message_id: str
    type: str
    content_type: str | None
    headers: Mapping[str, Any]
    body: bytes
    timestamp: dt.datetime
    correlation_id: str | None


class Outlet(Protocol):
    """Where a publication's messages go (the worker's: an exchange, publisher confirms)."""

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish in order; return once every message is confirmed, raise ``PublishUnavailable`` otherwise."""

    async def close(self) -> None:
        """Close its connection."""


def _default(value: Any) -> Any:
    """JSON for what ``json`` does not know: times in ISO 8601, ids and decimals as strings, enums by value."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_data(data: Any, format_: Format) -> bytes:
    """A ``Public``'s data as its body: bytes as they are, else JSON (compact, UTF-8) or msgpack."""
    if data is None:
        return b""
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if format_ == "msgpack":
        return msgpack.packb(data, default=_default)
    return _JSON.encode(data).encode()


#: Compact JSON, UTF-8 as it is; one encoder for every body (``json.dumps`` with options makes one per call).
_JSON = json.JSONEncoder(default=_default, separators=(",", ":"), ensure_ascii=False)


def source_of(deployment: str, publication: str) -> str:
    """The CloudEvents ``source`` of a deployment's publication (a URI reference)."""
    return f"/eventfleet/{deployment}/publications/{publication}"


#: The event metadata carried as extension attributes: (metadata key, attribute).
_CARRIED = ((correlation_ids.CORRELATION_ID, CORRELATION_ID), (correlation_ids.CAUSATION_ID, CAUSATION_ID),
            (tracing.TRACEPARENT, tracing.TRACEPARENT), (tracing.TRACESTATE, tracing.TRACESTATE))


def attributes_of(public: Public, event: RecordedEvent, source: str, format_: Format = "json") -> dict[str, Any]:
    """The CloudEvents attributes of ``public`` made of ``event`` (see the module doc)."""
    attributes: dict[str, Any] = {
        "specversion": "1.0", "id": str(event.event_id), "source": source, "type": public.type_name,
        "subject": event.stream_id, "time": event.recorded_at, "datacontenttype": CONTENT_TYPES[format_],
        STREAM_VERSION: event.version, POSITION: event.global_position,
    }
    metadata = event.metadata
    for key, attribute in _CARRIED:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            attributes[attribute] = value
    return attributes


def checked(attributes: dict[str, Any], body: bytes) -> rabbitmq.RabbitMQMessage:
    """The binary-mode message the CloudEvents SDK makes of these attributes, validating them (``envelope``
    writes the same headers without the SDK's per-event validation; the tests hold the two equal)."""
    return rabbitmq.to_binary(CloudEvent(dict(attributes), body), _FORMAT)


def _rfc3339(time: dt.datetime) -> str:
    text = time.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def envelope(public: Public, event: RecordedEvent, source: str, format_: Format = "json") -> Outgoing:
    """The message of ``public``, made of ``event``: CloudEvents in the binary mode of its RabbitMQ binding,
    written as ``cloudevents.core.bindings.rabbitmq.to_binary`` writes it (``checked``): every attribute but
    ``datacontenttype`` a ``ce-`` header (its value as a string, the time in RFC 3339 with ``Z``), the data
    the body. The attributes are valid by construction (the names are fixed, the values non-empty strings and
    integers), so the SDK's per-event validation, half the cost of a message, is left to the tests."""
    for key in public.headers:
        if key.lower().startswith(rabbitmq.CE_PREFIX):
            raise errors.InvalidInput(f"header {key!r}: the ce- headers are the CloudEvents envelope's own")
    if not public.type:
        raise errors.InvalidInput("a public message's type must not be empty")
    type_name = public.type_name
    if len(type_name) > 63 and len(type_name.encode()) > 255:
        raise errors.InvalidInput(f"a public message's type with its version is its routing key: at most 255 "
                                  f"bytes, got {len(type_name.encode())}")
    # attributes_of's attributes, written straight into their headers (a hot path: one message per event).
    event_id = str(event.event_id)
    headers: dict[str, Any] = dict(public.headers) if public.headers else {}
    headers.update({"ce-specversion": "1.0", "ce-id": event_id, "ce-source": source, "ce-type": type_name,
                    "ce-subject": event.stream_id, "ce-time": _rfc3339(event.recorded_at),
                    _CE_STREAM_VERSION: str(event.version), _CE_POSITION: str(event.global_position)})
    metadata = event.metadata
    correlation = None
    if metadata:
        for key, header in _CARRIED_HEADERS:
            value = metadata.get(key)
            if isinstance(value, str) and value:
                headers[header] = value
        correlation = headers.get(_CE_CORRELATION_ID)
        if correlation is not None and len(correlation.encode()) > correlation_ids.MAX_ID_BYTES:
            correlation = None  # longer than the AMQP property (a shortstr) takes: in its ce- header only
    return Outgoing(type_name, event_id, type_name, CONTENT_TYPES[format_], headers,
                    encode_data(public.data, format_), event.recorded_at, correlation)


_CE_STREAM_VERSION, _CE_POSITION = rabbitmq.CE_PREFIX + STREAM_VERSION, rabbitmq.CE_PREFIX + POSITION
_CE_CORRELATION_ID = rabbitmq.CE_PREFIX + CORRELATION_ID
_CARRIED_HEADERS = tuple((key, rabbitmq.CE_PREFIX + attribute) for key, attribute in _CARRIED)


Mapper = Callable[[Any, RecordedEvent], "Public | None"]


class Publication(Projection):
    """Base class of publications: handlers ``def h(self, event: RecordedEvent) -> Public | None``."""

    kind: ClassVar[str] = "publication"
    replayable: ClassVar[bool] = False
    tables: ClassVar[tuple[str, ...]] = ()
    ddl: ClassVar[LiteralString] = "SELECT 1"
    #: The body format: JSON (the default) or msgpack.
    format: ClassVar[Format] = "json"
    #: The topic exchange it publishes to (``{prefix}`` is replaced by the deployment's prefix); None: the
    #: deployment's ``{prefix}.integration``.
    exchange: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if cls.personal:
            raise TypeError(f"{cls.__name__}: a publication has no tables, so no personal columns; leave "
                            f"personal values out of its messages (what is published cannot be forgotten)")
        super().__init_subclass__(**kwargs)

    def __init__(self) -> None:
        self._outlet: Outlet | None = None
        self._source: str | None = None
        self._attaching = asyncio.Lock()
        #: The messages of the batch running on each connection (by ``id``), published by ``before_commit``.
        self._pending: dict[int, list[Outgoing]] = {}

    async def attach(self, store: EventStore, runtime: Runtime | None) -> None:
        """Open the outlet its messages go to (once per process: every partition's consumer shares it)."""
        async with self._attaching:
            if self._outlet is not None:
                return
            if runtime is None:
                raise errors.ConfigError(f"publication {self.name} publishes through a worker's broker connection: "
                                         "it needs one (a runtime) to apply events")
            self._source = source_of(runtime.deployment, self.name)
            self._outlet = await runtime.outlet(self)

    async def detach(self) -> None:
        """Close the outlet (the worker's consumers of it have stopped)."""
        outlet, self._outlet = self._outlet, None
        if outlet is not None:
            await outlet.close()

    def public(self, event: RecordedEvent) -> Public | None:
        """The public message of an event: its handler's, or None (not published)."""
        handler = self._handlers.get(type(event.event))
        if handler is None:
            return None
        mapper: Mapper = handler  # type: ignore[assignment]  # a publication's handlers map, they take no connection
        mapped = mapper(self, event)
        if mapped is not None and not isinstance(mapped, Public):
            raise TypeError(f"publication {self.name}: a handler returns a Public or None, not "
                            f"{type(mapped).__name__}")
        return mapped

    def outgoing(self, event: RecordedEvent) -> Outgoing | None:
        """The message of one event, enveloped, or None."""
        public = self.public(event)
        if public is None:
            return None
        assert self._source is not None
        return envelope(public, event, self._source, self.format)

    def begin(self, conn: db.Conn) -> None:
        self._pending[id(conn)] = []

    async def apply(self, conn: db.Conn, event: RecordedEvent) -> None:
        """Map one event; its message waits for ``before_commit``."""
        message = self.outgoing(event)
        if message is not None:
            self._pending.setdefault(id(conn), []).append(message)

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Map every event (a mapping that raises makes the worker rerun the batch event by event, to park the
        one that fails); their messages wait for ``before_commit``."""
        messages = [m for m in map(self.outgoing, events) if m is not None]
        self._pending.setdefault(id(conn), []).extend(messages)

    async def before_commit(self, conn: db.Conn) -> None:
        """Publish the batch's messages in order and wait for every confirm; the transaction commits after."""
        messages = self._pending.pop(id(conn), [])
        if messages:
            await self._bound().publish(messages)

    def _bound(self) -> Outlet:
        if self._outlet is None:
            raise errors.ConfigError(f"publication {self.name} is not attached to an outlet (Publication.attach)")
        return self._outlet

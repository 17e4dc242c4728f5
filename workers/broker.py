"""RabbitMQ names, topology and the message formats (docs/reference.md, "Messages").

Projections are fed by partition: the relay publishes each partition's events, in order, as batch messages
to the direct exchange ``{prefix}.partitions`` with the partition number as routing key; every projection has
one durable quorum queue per partition, ``{prefix}.{projection}.{partition}``, with a single active consumer.
A batch body is a msgpack array of event maps (``event_map``); its headers carry the partition, the count
and the first and last positions. The per-event topic exchange ``{prefix}.events`` (one message per event,
routing key = event type) is there for other consumers when the relay is asked to feed it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp import commands as spec

from store import codec, correlation_ids, errors, names, tracing
from store.event_store import Position, RecordedEvent
from store.records import Undecodable
from workers.errors import MalformedMessage

logger = logging.getLogger(__name__)

#: The largest body the decoders accept unless told (a worker passes its ``Settings.max_message_bytes``).
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
#: Header of a message whose stored event the relay could not encode (see encode_undecodable_row).
UNDECODABLE_HEADER = "x-eventfleet-undecodable"
#: Metadata keys a message's headers repeat: the event's correlation, causation and stored trace context.
PROPAGATED = (correlation_ids.CORRELATION_ID, correlation_ids.CAUSATION_ID, *tracing.KEYS)
_REQUIRED = ("event_id", "stream_id", "version", "global_position", "event_type", "data", "metadata",
             "recorded_at")


@dataclasses.dataclass(frozen=True, slots=True)
class Names:
    """Every exchange and queue name of one deployment, derived from its prefix."""

    prefix: str

    def __post_init__(self) -> None:
        names.prefix(self.prefix)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def partitions_exchange(self) -> str:
        return f"{self.prefix}.partitions"

    @property
    def integration_exchange(self) -> str:
        """The topic exchange publications publish their integration events to (routing key: public type)."""
        return f"{self.prefix}.integration"

    def queue(self, projection: str) -> str:
        """The stem of a projection's queue names (its dead-letter queue and its partitions' queues)."""
        return f"{self.prefix}.{names.identifier(projection, what='projection')}"

    def partition_queue(self, projection: str, partition: int) -> str:
        return f"{self.queue(projection)}.{partition}"

    def dead_letter_queue(self, projection: str) -> str:
        return f"{self.queue(projection)}.dlq"

    def group_queue(self, group: str, partition: int) -> str:
        """A worker group's queue of one partition (``EVENTFLEET_GROUP``): it feeds every read model the group
        runs. A projection name has no dots, so ``{prefix}.group.{group}.{p}`` is never a projection's queue."""
        return f"{self.prefix}.group.{names.identifier(group, what='worker group')}.{partition}"


def group_lease(group: str) -> str:
    """The name a worker group's partitions are leased under (``leases.projection``): never a projection's
    (a projection name has no colon)."""
    return f"group:{names.identifier(group, what='worker group')}"


def group_of_lease(lease: str) -> str | None:
    """The worker group a lease name is of, or None for a projection's."""
    return lease.removeprefix("group:") if lease.startswith("group:") else None


async def passive_queue(connection: AbstractConnection, name: str) -> spec.Queue.DeclareOk | None:
    """A queue's passive declaration (its message and consumer counts), or None when it does not exist.
    A miss closes the channel it was asked on, so each question gets a channel of its own."""
    channel = await connection.channel()
    try:
        return (await channel.declare_queue(name, passive=True)).declaration_result
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def exchange_exists(connection: AbstractConnection, name: str) -> bool:
    """Whether an exchange exists (a passive declare on a channel of its own, as ``passive_queue``)."""
    channel = await connection.channel()
    try:
        await channel.declare_exchange(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def declare_exchange(channel: AbstractChannel, n: Names) -> AbstractExchange:
    """Declare (idempotently) the durable topic exchange events are published to."""
    return await channel.declare_exchange(n.exchange, aio_pika.ExchangeType.TOPIC, durable=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Targets:
    """Where the relay publishes: the partitions exchange (P partitions) and, when asked, the per-event
    topic exchange; and how big a batch message may grow."""

    partitions_exchange: AbstractExchange
    partitions: int
    events_exchange: AbstractExchange | None = None
    message_events: int = 100
    message_bytes: int = 1024 * 1024


async def declare_topology(channel: AbstractChannel, n: Names, projections: Iterable[str], partitions: int, *,
                           events_exchange: bool = False, message_events: int = 100,
                           message_bytes: int = 1024 * 1024, group: str | None = None) -> Targets:
    """Declare (idempotently) everything the relay publishes to and the workers consume: the partitions
    exchange and queues of every projection (``declare_partitions``), or with ``group`` that worker group's
    queues and the projections' dead-letter queues only (``declare_group``), and, with ``events_exchange``, the
    per-event topic exchange for other consumers. Returns the relay's targets."""
    if group is None:
        exchange = await declare_partitions(channel, n, projections, partitions)
    else:
        exchange = await declare_group(channel, n, group, projections, partitions)
    events = await declare_exchange(channel, n) if events_exchange else None
    return Targets(exchange, partitions, events, message_events, message_bytes)


async def delete_topology(channel: AbstractChannel, n: Names, projections: Iterable[str], partitions: int) -> None:
    """Delete what declare_topology declared (tests and benchmarks clean up with it)."""
    await delete_partitions(channel, n, projections, partitions)
    await channel.exchange_delete(n.exchange)
    await channel.exchange_delete(n.integration_exchange)


#: ``x-delivery-limit`` of every quorum queue declared here: deliveries of one message before the broker
#: dead-letters it on its own. RabbitMQ 4.x gives a quorum queue declared without one a limit of 20, and
#: every return counts (a lease handover returns the prefetched messages), so it must be set; its "no
#: limit", -1, cannot be used: 3.10-3.13 take any value below 1 as a limit of 0 (measured on 3.10.8: -1 and
#: 0 dead-letter a message at its first return). 2^31 - 1 means the same on every version (returns that
#: never happen) and a queue keeps it through an upgrade to 4.x. With a limit set, 3.x requeues a returned
#: message at the head of the queue (without one, at the back; measured on 3.10.8): a handover keeps order.
DELIVERY_LIMIT = 2**31 - 1


def partition_queue_arguments(n: Names, projection: str) -> dict[str, Any]:
    """The arguments a partition queue is declared with (docs/reference.md, "Messages")."""
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-queue-leader-locator": "balanced",
        "x-dead-letter-exchange": n.dead_letter_exchange,
        "x-dead-letter-routing-key": projection,
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def dead_letter_queue_arguments() -> dict[str, Any]:
    """The arguments a dead-letter queue is declared with: reading one (``dead-letters``) returns messages too."""
    return {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}


async def declare_partitions(channel: AbstractChannel, n: Names, projections: Iterable[str],
                             partitions: int) -> AbstractExchange:
    """Declare (idempotently) the partitions exchange and, per projection, its dead-letter queue and one quorum
    queue per partition (single active consumer, leaders balanced over a cluster's nodes, ``DELIVERY_LIMIT``)
    bound by partition number. Returns the partitions exchange (on ``channel``).

    A queue declared before the delivery limit was (by an older version) keeps its arguments: the broker
    refuses to redeclare it with another (PRECONDITION_FAILED), so it is declared as it was, and a warning
    names it (on RabbitMQ 4.x it dead-letters a message after 20 deliveries: docs/reference.md, "Messages",
    says how to redeclare it). The queues are declared on a channel of their own, since a refusal closes the
    channel it was asked on, and ``channel`` may be one the caller publishes on.
    """
    exchange = await channel.declare_exchange(n.partitions_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(n.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    declaring = _Declaring(await _connection_of(channel).channel())
    try:
        for projection in projections:
            dlq = await declaring.queue(n.dead_letter_queue(projection), dead_letter_queue_arguments())
            await dlq.bind(n.dead_letter_exchange, routing_key=projection)
            for partition in range(partitions):
                queue = await declaring.queue(n.partition_queue(projection, partition),
                                              partition_queue_arguments(n, projection))
                await queue.bind(n.partitions_exchange, routing_key=str(partition))
    finally:
        await declaring.close()
    if declaring.without_limit:
        logger.warning("queues declared without x-delivery-limit by an older version: on RabbitMQ 4.x the broker "
                       "dead-letters a message of theirs after 20 deliveries; redeclare them (docs/reference.md, "
                       "Messages)", extra={"queues": declaring.without_limit, "server": server_version(channel)})
    return exchange


def group_queue_arguments() -> dict[str, Any]:
    """The arguments a worker group's partition queue is declared with: a partition queue's, without a
    dead-letter exchange (its consumer never rejects: what a read model dead-letters is copied to that read
    model's DLQ, and the message is acked once every read model of the group settled it)."""
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-queue-leader-locator": "balanced",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


async def declare_group(channel: AbstractChannel, n: Names, group: str, projections: Iterable[str],
                        partitions: int) -> AbstractExchange:
    """Declare (idempotently) the partitions exchange, the projections' dead-letter queues (no partition queue
    of theirs) and the worker group's P queues, bound by partition number. Returns the partitions exchange."""
    exchange = await declare_partitions(channel, n, projections, 0)
    declaring = _Declaring(await _connection_of(channel).channel())
    try:
        for partition in range(partitions):
            queue = await declaring.queue(n.group_queue(group, partition), group_queue_arguments())
            await queue.bind(n.partitions_exchange, routing_key=str(partition))
    finally:
        await declaring.close()
    return exchange


async def delete_group(channel: AbstractChannel, n: Names, group: str, partitions: int) -> None:
    """Delete a worker group's queues."""
    for partition in range(partitions):
        await channel.queue_delete(n.group_queue(group, partition))


class _Declaring:
    """Queue declarations on a channel of their own, reopened after a refusal."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.without_limit: list[str] = []

    async def queue(self, name: str, arguments: dict[str, Any]) -> AbstractQueue:
        try:
            return await self.channel.declare_queue(name, durable=True, arguments=arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            if "x-delivery-limit" not in str(exc):
                raise
        # Declared before DELIVERY_LIMIT: as it was (the broker compares every argument, so this one alone).
        await self.channel.reopen()
        self.without_limit.append(name)
        legacy = {k: v for k, v in arguments.items() if k != "x-delivery-limit"}
        return await self.channel.declare_queue(name, durable=True, arguments=legacy)

    async def close(self) -> None:
        if not self.channel.is_closed:
            await self.channel.close()


def _connection_of(channel: AbstractChannel) -> AbstractConnection:
    """The connection a channel was opened on (aio-pika keeps it, without a public accessor)."""
    connection: AbstractConnection = getattr(channel, "_connection")  # noqa: B009 - private attribute
    return connection


def server_version(channel_or_connection: AbstractChannel | AbstractConnection) -> str | None:
    """The RabbitMQ version the broker announced when the connection opened (``3.10.8``), if it did."""
    connection = (channel_or_connection if isinstance(channel_or_connection, AbstractConnection)
                  else _connection_of(channel_or_connection))
    raw = getattr(getattr(connection, "transport", None), "connection", None)
    properties = getattr(raw, "server_properties", None) or {}
    version = properties.get("version")
    return version.decode() if isinstance(version, bytes) else version if isinstance(version, str) else None


async def delete_partitions(channel: AbstractChannel, n: Names, projections: Iterable[str], partitions: int) -> None:
    """Delete what declare_partitions declared."""
    for projection in projections:
        for partition in range(partitions):
            await channel.queue_delete(n.partition_queue(projection, partition))
        await channel.queue_delete(n.dead_letter_queue(projection))
    await channel.exchange_delete(n.partitions_exchange)
    await channel.exchange_delete(n.dead_letter_exchange)


def to_message(event: RecordedEvent) -> aio_pika.Message:
    """The contract's message for a stored event: msgpack body, event id as message id, persistent."""
    return _message(event.event_id, event.stream_id, event.version, event.global_position,
                    event.position.transaction_id, event.event_type, event.data, event.metadata, event.recorded_at)


def message_from_body(body: bytes, event_id: uuid.UUID, event_type: str, stream_id: str,
                      version: int, extra_headers: Mapping[str, str] | None = None) -> aio_pika.Message:
    """Wrap an encoded body with the contract's properties and headers (and ``extra_headers``, whose
    ``correlation_id`` is also the message's AMQP property when it fits one)."""
    correlation_id = extra_headers.get(correlation_ids.CORRELATION_ID) if extra_headers else None
    if correlation_id and len(correlation_id.encode()) > correlation_ids.MAX_ID_BYTES:
        correlation_id = None  # a NewEvent's own metadata may hold one longer than an AMQP shortstr
    return aio_pika.Message(
        body,
        message_id=str(event_id),
        correlation_id=correlation_id or None,
        content_type="application/msgpack",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={"event_type": event_type, "stream_id": stream_id, "version": version,
                 **(extra_headers or {})},
    )


def encode_row(row: Any) -> aio_pika.Message:
    """Build the message straight from an events row, without decoding the payload (the relay's path).

    Raises CodecError when the row's metadata is not a msgpack map (see ``encode_undecodable_row``).
    """
    metadata = codec.unpackb(row["metadata"])
    if not isinstance(metadata, dict):
        raise errors.CorruptEvent(f"metadata is a msgpack {type(metadata).__name__}, not a map")
    return _encode_row(row, metadata)


def encode_undecodable_row(row: Any, reason: str) -> aio_pika.Message:
    """The message of a row ``encode_row`` refused: every field of the contract's body, but ``metadata``
    holds the stored bytes as they are (a msgpack bin, not a map) and ``undecodable`` says why.

    The event is committed and the store is the truth, so the relay must neither drop the row nor stop
    at it. The message keeps the contract's keys, routing and headers, so any consumer can see which
    event it is; ``from_body`` (every worker, and workers older than the flag by the bin-typed metadata
    alone) refuses it as malformed, so each projection dead-letters it with the raw body kept. Carrying
    an empty map instead would have let consumers that ignore the flag apply an event whose metadata
    they never saw. The ``UNDECODABLE_HEADER`` header repeats the reason for consumers that read headers.
    """
    return _encode_row(row, row["metadata"], undecodable=reason)


def _encode_row(row: Any, metadata: Any, undecodable: str | None = None) -> aio_pika.Message:
    return _message(row["event_id"], row["stream_id"], row["version"], row["global_position"],
                    row["transaction_id"], row["event_type"], row["data"], metadata, row["recorded_at"],
                    undecodable)


def _message(event_id: uuid.UUID, stream_id: str, version: int, global_position: int, transaction_id: int,
             event_type: str, data: bytes, metadata: Any, recorded_at: dt.datetime,
             undecodable: str | None = None) -> aio_pika.Message:
    """The one builder of the contract's body (``to_message`` from a decoded event, ``encode_row`` from a row)."""
    body = {
        "event_id": str(event_id),
        "stream_id": stream_id,
        "version": version,
        "global_position": global_position,
        "transaction_id": transaction_id,
        "event_type": event_type,
        "data": data,
        "metadata": metadata,
        "recorded_at": msgpack.Timestamp.from_datetime(recorded_at),
    }
    flag = {k: v for k in PROPAGATED if isinstance(v := metadata.get(k), str)} if isinstance(metadata, dict) else {}
    if undecodable is not None:
        body["undecodable"] = flag[UNDECODABLE_HEADER] = undecodable
    return message_from_body(codec.packb(body), event_id, event_type, stream_id, version, flag)


def _unpack(body: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    if len(body) > max_bytes:
        raise MalformedMessage(f"message of {len(body)} bytes is over the {max_bytes} limit")
    try:
        return msgpack.unpackb(body, ext_hook=codec.ext_hook, raw=False, timestamp=3)
    except Exception as exc:  # msgpack raises many unrelated types for corrupt input
        raise MalformedMessage(f"body is not msgpack: {type(exc).__name__}: {exc}") from exc


def from_body(body: bytes, registry: codec.Registry = codec.REGISTRY) -> RecordedEvent:
    """Decode a delivered one-event body (``to_message``) into a RecordedEvent; anything wrong raises
    MalformedMessage."""
    fields = _unpack(body)
    if not isinstance(fields, dict):
        raise MalformedMessage("body is not a msgpack map")
    event = _event(fields, registry)
    if isinstance(event.event, Undecodable):  # of a type this code does not know: not one to re-drive here
        raise MalformedMessage(f"{type(event.event.error).__name__}: {event.event.error}") from event.event.error
    return event


def _coordinates(fields: Mapping[str, Any]) -> tuple[uuid.UUID, str, int, int, int, str, dt.datetime]:
    """Where an event map's event sits, checked; raises MalformedMessage."""
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise MalformedMessage(f"body lacks {missing}")
    try:
        event_id = uuid.UUID(str(fields["event_id"]))
        stream_id = names.stream_id(fields["stream_id"])
    except (errors.InvalidInput, ValueError, TypeError) as exc:
        raise MalformedMessage(f"{type(exc).__name__}: {exc}") from exc
    version, position, txid = fields["version"], fields["global_position"], fields.get("transaction_id", 0)
    event_type, recorded_at = fields["event_type"], fields["recorded_at"]
    for value, kind in ((version, int), (position, int), (txid, int), (event_type, str), (recorded_at, dt.datetime)):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MalformedMessage(f"body field of type {type(value).__name__} where {kind.__name__} belongs")
    # Postgres bigint / xid8 ranges: a bigger value would fail at the checkpoint, not here, as poison.
    if not (0 <= version < 2**63 and 1 <= position < 2**63 and 0 <= txid < 2**64):
        raise MalformedMessage(f"version {version} / position {position} / transaction {txid} out of range")
    return event_id, stream_id, version, position, txid, event_type, recorded_at


def _event(fields: Mapping[str, Any], registry: codec.Registry) -> RecordedEvent:
    event_id, stream_id, version, position, txid, event_type, recorded_at = _coordinates(fields)
    if "undecodable" in fields:  # see encode_undecodable_row
        raise MalformedMessage(f"the relay could not encode event {fields['event_id']}: {fields['undecodable']}")
    data, metadata = fields["data"], fields["metadata"]
    for value, kind in ((data, bytes), (metadata, dict)):
        if not isinstance(value, kind):
            raise MalformedMessage(f"body field of type {type(value).__name__} where {kind.__name__} belongs")
    try:
        payload: Any = registry.decode(event_type, data, (event_id, stream_id))
    except errors.UnknownEventType as exc:  # a type of newer code (or none at all): not corrupt, see handlers
        payload = Undecodable(exc)
    except (errors.CodecError, errors.InvalidInput, ValueError, TypeError) as exc:
        raise MalformedMessage(f"{type(exc).__name__}: {exc}") from exc
    return RecordedEvent(event_id=event_id, stream_id=stream_id, version=version, global_position=position,
                         position=Position(txid, position), event_type=event_type, event=payload, data=data,
                         metadata=metadata, recorded_at=recorded_at)


# --- batch messages: one partition's events, in order ---------------------------------------------------

#: The ``type`` property of a batch message.
BATCH_TYPE = "eventfleet.batch.v1"


def event_map(row: Any) -> dict[str, Any]:
    """The map of one stored event in a batch body (the keys of ``to_message``'s body), built from an events
    row without decoding the payload. A row whose metadata is not a msgpack map is flagged ``undecodable``
    and keeps the stored bytes (see ``encode_undecodable_row``): workers park it, they never drop it."""
    fields = {
        "event_id": str(row["event_id"]), "stream_id": row["stream_id"], "version": row["version"],
        "global_position": row["global_position"], "transaction_id": row["transaction_id"],
        "event_type": row["event_type"], "data": row["data"], "metadata": row["metadata"],
        "recorded_at": msgpack.Timestamp.from_datetime(row["recorded_at"]),
    }
    try:
        metadata = codec.unpackb(row["metadata"])
    except errors.CodecError as exc:
        fields["undecodable"] = f"{type(exc).__name__}: {exc}"
        return fields
    if not isinstance(metadata, dict):
        fields["undecodable"] = f"metadata is a msgpack {type(metadata).__name__}, not a map"
    else:
        fields["metadata"] = metadata
    return fields


def batch_message(partition: int, rows: Sequence[Any], entries: Sequence[Mapping[str, Any]]) -> aio_pika.Message:
    """One partition's events as one message: persistent, the body a msgpack array of ``event_map``s."""
    first, last = rows[0], rows[-1]
    undecodable = sum(1 for e in entries if "undecodable" in e)
    headers: dict[str, Any] = {"partition": partition, "count": len(entries),
                               "first_position": first["global_position"], "last_position": last["global_position"]}
    if undecodable:
        headers[UNDECODABLE_HEADER] = undecodable
    return aio_pika.Message(
        codec.packb(list(entries)), message_id=f"{first['event_id']}+{len(entries)}", type=BATCH_TYPE,
        content_type="application/msgpack", delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers)


def events_message(partition: int, events: Sequence[RecordedEvent]) -> aio_pika.Message:
    """A batch message of stored events as decoded (tools and tests; the relay builds its own from rows)."""
    rows = [{"event_id": e.event_id, "stream_id": e.stream_id, "version": e.version,
             "global_position": e.global_position, "transaction_id": e.position.transaction_id,
             "event_type": e.event_type, "data": e.data, "metadata": codec.packb(e.metadata),
             "recorded_at": e.recorded_at} for e in events]
    return batch_message(partition, rows, [event_map(r) for r in rows])


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """A decoded batch message: its events in order; ``dropped`` counts maps too broken to place (their
    events reach the projection from the store, as a gap)."""

    events: list[RecordedEvent]
    dropped: int = 0
    #: Events of names the reader does not handle, left out undecoded (``from_batch_body``'s ``names``).
    unhandled: int = 0


def from_batch_body(body: bytes, registry: codec.Registry = codec.REGISTRY, *,
                    max_bytes: int = MAX_MESSAGE_BYTES, names: frozenset[str] | None = None) -> Batch:
    """Decode a batch body. A body that is not an array of maps, or is over ``max_bytes``, raises
    MalformedMessage (dead-lettered whole); an event whose payload cannot be decoded comes back with an
    ``Undecodable`` payload (parked per policy, alone); a map without the coordinates of an event is dropped
    and counted. With ``names`` (a read model's handled event names), the events of other names are left out
    undecoded: only their type is read."""
    entries = _unpack(body, max_bytes)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MalformedMessage("batch body is not a msgpack array of maps")
    unhandled = 0
    if names is not None:
        kept = [e for e in entries if not isinstance(t := e.get("event_type"), str) or t.rpartition(".v")[0] in names]
        entries, unhandled = kept, len(entries) - len(kept)
    registry.preload_keys(fields.get("data") for fields in entries)  # one round trip for the batch's new subjects
    events: list[RecordedEvent] = []
    dropped = 0
    for fields in entries:
        try:
            events.append(_event(fields, registry))
        except MalformedMessage as exc:
            try:
                event_id, stream_id, version, position, txid, event_type, recorded_at = _coordinates(fields)
            except MalformedMessage:
                dropped += 1
                continue
            cause = errors.CorruptEvent(f"{stream_id}@{version} ({event_type}): {exc}")
            data = fields["data"] if isinstance(fields.get("data"), bytes) else b""
            events.append(RecordedEvent(event_id=event_id, stream_id=stream_id, version=version,
                                        global_position=position, position=Position(txid, position),
                                        event_type=event_type, event=Undecodable(cause), data=data, metadata={},
                                        recorded_at=recorded_at))
    return Batch(events, dropped, unhandled)

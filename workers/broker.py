"""RabbitMQ names, topology and the message format of CONTRACT.md."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractExchange

from store import codec, errors, names
from store.event_store import Position, RecordedEvent
from workers.errors import MalformedMessage

MAX_MESSAGE_BYTES = 2 * 1024 * 1024
#: Header of a message whose stored event the relay could not encode (see encode_undecodable_row).
UNDECODABLE_HEADER = "x-eventfleet-undecodable"
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

    def queue(self, projection: str) -> str:
        return f"{self.prefix}.{names.identifier(projection, what='projection')}"

    def dead_letter_queue(self, projection: str) -> str:
        return f"{self.queue(projection)}.dlq"


async def declare_exchange(channel: AbstractChannel, n: Names) -> AbstractExchange:
    """Declare (idempotently) the durable topic exchange events are published to."""
    return await channel.declare_exchange(n.exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_topology(channel: AbstractChannel, n: Names, projections: Iterable[str]) -> AbstractExchange:
    """Declare the exchange and, per projection, its quorum queue bound with '#' and its dead-letter queue."""
    exchange = await declare_exchange(channel, n)
    dlx = await channel.declare_exchange(n.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    for projection in projections:
        dlq = await channel.declare_queue(n.dead_letter_queue(projection), durable=True,
                                          arguments={"x-queue-type": "quorum"})
        await dlq.bind(dlx, routing_key=projection)
        queue = await channel.declare_queue(
            n.queue(projection), durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": n.dead_letter_exchange,
                "x-dead-letter-routing-key": projection,
            },
        )
        await queue.bind(exchange, routing_key="#")
    return exchange


async def delete_topology(channel: AbstractChannel, n: Names, projections: Iterable[str]) -> None:
    """Delete what declare_topology declared (tests and benchmarks clean up with it)."""
    for projection in projections:
        await channel.queue_delete(n.queue(projection))
        await channel.queue_delete(n.dead_letter_queue(projection))
    await channel.exchange_delete(n.exchange)
    await channel.exchange_delete(n.dead_letter_exchange)


def to_message(event: RecordedEvent) -> aio_pika.Message:
    """The contract's message for a stored event: msgpack body, event id as message id, persistent."""
    return _message(event.event_id, event.stream_id, event.version, event.global_position,
                    event.position.transaction_id, event.event_type, event.data, event.metadata, event.recorded_at)


def message_from_body(body: bytes, event_id: uuid.UUID, event_type: str, stream_id: str,
                      version: int, extra_headers: Mapping[str, str] | None = None) -> aio_pika.Message:
    """Wrap an encoded body with the contract's properties and headers (and ``extra_headers``)."""
    return aio_pika.Message(
        body,
        message_id=str(event_id),
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
    flag: dict[str, str] = {}
    if undecodable is not None:
        body["undecodable"] = flag[UNDECODABLE_HEADER] = undecodable
    return message_from_body(codec.packb(body), event_id, event_type, stream_id, version, flag)


def from_body(body: bytes, registry: codec.Registry = codec.REGISTRY) -> RecordedEvent:
    """Decode a delivered body into a RecordedEvent; anything wrong raises MalformedMessage."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"message of {len(body)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    try:
        fields = msgpack.unpackb(body, ext_hook=codec.ext_hook, raw=False, timestamp=3)
    except Exception as exc:  # msgpack raises many unrelated types for corrupt input
        raise MalformedMessage(f"body is not msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(fields, dict):
        raise MalformedMessage("body is not a msgpack map")
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise MalformedMessage(f"body lacks {missing}")
    if "undecodable" in fields:  # see encode_undecodable_row
        raise MalformedMessage(f"the relay could not encode event {fields['event_id']}: {fields['undecodable']}")
    try:
        event_id = uuid.UUID(str(fields["event_id"]))
        stream_id = names.stream_id(fields["stream_id"])
        version, position, txid = fields["version"], fields["global_position"], fields.get("transaction_id", 0)
        event_type, data, metadata, recorded_at = (fields["event_type"], fields["data"], fields["metadata"],
                                                   fields["recorded_at"])
        for value, kind in ((version, int), (position, int), (txid, int), (event_type, str), (data, bytes),
                            (metadata, dict), (recorded_at, dt.datetime)):
            if not isinstance(value, kind) or isinstance(value, bool):
                raise MalformedMessage(f"body field of type {type(value).__name__} where {kind.__name__} belongs")
        # Postgres bigint / xid8 ranges: a bigger value would fail at the checkpoint, not here, as poison.
        if not (0 <= version < 2**63 and 1 <= position < 2**63 and 0 <= txid < 2**64):
            raise MalformedMessage(f"version {version} / position {position} / transaction {txid} out of range")
        payload = registry.decode(event_type, data)
    except MalformedMessage:
        raise
    except (errors.CodecError, errors.InvalidInput, ValueError, TypeError) as exc:
        raise MalformedMessage(f"{type(exc).__name__}: {exc}") from exc
    return RecordedEvent(event_id=event_id, stream_id=stream_id, version=version, global_position=position,
                         position=Position(txid, position), event_type=event_type, event=payload, data=data,
                         metadata=metadata, recorded_at=recorded_at)



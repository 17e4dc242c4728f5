"""One relay batch, one transaction: claim (and delete) outbox rows, publish them with confirms, commit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractExchange
from pamqp import commands as spec

from store import codec, db, outbox, tracing
from store import errors as store_errors
from store.partitions import partition_of
from workers import broker
from workers.errors import BrokerUnavailable, PublishFailed
from workers.runtime import metrics

logger = logging.getLogger(__name__)


async def publish_confirmed(exchange: AbstractExchange, messages: Sequence[tuple[str, aio_pika.Message]],
                            confirm_timeout: float, *, mandatory: bool = True) -> None:
    """Publish (routing key, message) pairs pipelined, then wait for every confirm; raise unless all acked.

    Every publish is started before any confirm is awaited: one round trip per batch, not per message.
    The channel must have publisher confirms and ``on_return_raises`` (a basic.return then raises
    ``PublishError``; without it aio-pika would return the DeliveredMessage instead of an Ack).
    """
    try:
        async with asyncio.timeout(confirm_timeout):
            results = await asyncio.gather(
                *(exchange.publish(m, routing_key=key, mandatory=mandatory) for key, m in messages),
                return_exceptions=True)
    except TimeoutError as exc:
        raise BrokerUnavailable(f"no confirms for a batch of {len(messages)} within {confirm_timeout}s") from exc
    for result in results:
        if isinstance(result, spec.Basic.Ack):
            continue
        if isinstance(result, aiormq.exceptions.PublishError):
            raise PublishFailed(f"broker returned a message as unroutable: {result}") from result
        if isinstance(result, aiormq.exceptions.DeliveryError):
            raise PublishFailed(f"broker nacked a message: {result}") from result
        if isinstance(result, aiormq.exceptions.AMQPError | ConnectionError | OSError | RuntimeError
                      | asyncio.CancelledError):
            # RuntimeError: aiormq's ChannelInvalidStateError (publishing on a closed channel).
            raise BrokerUnavailable(f"publishing failed: {type(result).__name__}: {result}") from result
        if isinstance(result, BaseException):
            raise result
        raise PublishFailed(f"broker did not ack a message: {result!r}")


def encode_rows(rows: Sequence[Any]) -> tuple[list[tuple[str, aio_pika.Message]], list[tuple[Any, str]]]:
    """One message per claimed row for the per-event topic exchange (routing key = event type), and the rows
    whose event could not be encoded.

    A row whose metadata is not a msgpack map (written around the store's API) must not stop the relay:
    every row behind it would wait forever. It is published anyway, flagged (see
    ``broker.encode_undecodable_row``), so each consumer dead-letters it and the store keeps the truth.
    """
    messages, undecodable = [], []
    for row in rows:
        try:
            message = broker.encode_row(row)
        except store_errors.CodecError as exc:
            message = broker.encode_undecodable_row(row, str(exc))
            undecodable.append((row, str(exc)))
        messages.append((row["event_type"], message))
    return messages, undecodable


#: Bytes a batch body spends per event besides its data, metadata, stream id and type name, at most: the keys,
#: the event id, the positions and the timestamp, and the msgpack headers around them (189 with the largest ints).
EVENT_OVERHEAD_BYTES = 200


def event_weight(row: Any) -> int:
    """What an events row takes in a batch body, at most (its metadata map packed as stored): a message's
    events weigh no more than ``message_bytes`` together, so its body stays under the workers' limit."""
    return (len(row["data"]) + len(row["metadata"]) + len(row["stream_id"].encode())
            + len(row["event_type"].encode()) + EVENT_OVERHEAD_BYTES)


def partition_batches(rows: Sequence[Any], partitions: int, *, message_events: int = 100,
                      message_bytes: int = 1024 * 1024) -> tuple[list[tuple[str, aio_pika.Message]], list[tuple[Any, str]]]:
    """The claimed rows as batch messages: per partition, in position order, up to ``message_events`` events
    or about ``message_bytes`` per message (an event bigger than that goes alone); routing key = partition.
    Also returns the rows flagged undecodable (their metadata is not msgpack: see ``broker.event_map``)."""
    grouped: dict[int, list[tuple[Any, dict[str, Any]]]] = {}
    undecodable: list[tuple[Any, str]] = []
    for row in rows:
        partition = row["partition"]
        if partition is None:  # written before partitions, not yet filled in by migrate
            partition = partition_of(row["stream_id"], partitions)
        entry = broker.event_map(row)
        if "undecodable" in entry:
            undecodable.append((row, entry["undecodable"]))
        grouped.setdefault(partition, []).append((row, entry))
    messages: list[tuple[str, aio_pika.Message]] = []
    for partition, items in grouped.items():
        chunk: list[tuple[Any, dict[str, Any]]] = []
        size = 0
        for row, entry in items:
            weight = event_weight(row)
            if chunk and (len(chunk) >= message_events or size + weight > message_bytes):
                messages.append(_batch(partition, chunk))
                chunk, size = [], 0
            chunk.append((row, entry))
            size += weight
        messages.append(_batch(partition, chunk))
    return messages, undecodable


def _carriers(rows: Sequence[Any]) -> Iterator[Mapping[str, Any]]:
    """The rows' metadata maps, decoded only if a recording span reads them (their trace contexts)."""
    for row in rows:
        with contextlib.suppress(store_errors.CodecError):
            metadata = codec.unpackb(row["metadata"])
            if isinstance(metadata, dict):
                yield metadata


def _batch(partition: int, chunk: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[str, aio_pika.Message]:
    return str(partition), broker.batch_message(partition, [r for r, _ in chunk], [e for _, e in chunk])


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    """What one relay transaction published: its events, and whether its claim stopped at a limit (rows or
    bytes), so more may be waiting."""

    events: int
    full: bool


async def publish_batch(pool: db.Pool, targets: broker.Targets, batch_size: int, *,
                        confirm_timeout: float = 30.0, batch_bytes: int = outbox.UNBOUNDED) -> int:
    """Claim up to batch_size rows and about ``batch_bytes`` of events (deleting them in the claim's statement),
    publish them as partition batches (and one message per event to the events exchange when it is a target),
    commit after every confirm (else roll back: the rows stay); return the count (``publish_claim`` also says
    whether the claim was full)."""
    return (await publish_claim(pool, targets, batch_size, confirm_timeout=confirm_timeout,
                                batch_bytes=batch_bytes)).events


async def publish_claim(pool: db.Pool, targets: broker.Targets, batch_size: int, *,
                        confirm_timeout: float = 30.0, batch_bytes: int = outbox.UNBOUNDED) -> Published:
    """``publish_batch``, returning what was published and whether the claim was full.

    The batches are sent as soon as the claim returns: no timer waits for more events, so a quiet store's
    events go out one per message at once and a busy one's fill their messages. The claim stops at the event
    that reaches ``batch_bytes`` (always one): the rows, their message bodies and the frames in flight are
    what the relay holds, so its memory follows the bytes, not the row count."""
    async with db.translate_errors(), db.committing(pool) as conn:
        rows = await outbox.claim(conn, batch_size, batch_bytes)
        if not rows:
            return Published(0, False)
        batches, undecodable = partition_batches(rows, targets.partitions, message_events=targets.message_events,
                                                 message_bytes=targets.message_bytes)
        exchange = targets.partitions_exchange
        with metrics.RELAY_BATCH_SECONDS.time(), tracing.publish_span(
                exchange.name, len(rows), _carriers(rows)):
            if targets.events_exchange is None:
                await publish_confirmed(exchange, batches, confirm_timeout)
            else:
                singles, _ = encode_rows(rows)
                # Not mandatory: the events exchange feeds whoever binds to it, perhaps nobody (an unroutable
                # message there is no loss: the partition queues carry every event).
                await asyncio.gather(publish_confirmed(exchange, batches, confirm_timeout),
                                     publish_confirmed(targets.events_exchange, singles, confirm_timeout,
                                                       mandatory=False))
    metrics.RELAY_PUBLISHED.inc(len(rows))
    metrics.RELAY_MESSAGES.inc(len(batches))
    for row, reason in undecodable:  # once committed: a rolled-back batch publishes them again
        logger.error("published an event that cannot be decoded, flagged for the dead letters", extra={
            "event_id": str(row["event_id"]), "stream_id": row["stream_id"], "version": row["version"],
            "event_type": row["event_type"], "error": reason})
    metrics.RELAY_UNDECODABLE.inc(len(undecodable))
    logger.debug("batch published", extra={"events": len(rows), "messages": len(batches),
                                           "last_position": rows[-1]["global_position"]})
    return Published(len(rows), len(rows) >= batch_size or bool(rows[-1]["reached"]))


async def relay_until_idle(pool: db.Pool, targets: broker.Targets, *, batch_size: int = 1000,
                           confirm_timeout: float = 30.0, batch_bytes: int = outbox.UNBOUNDED) -> int:
    """Publish batches until a claim finds nothing; return how many events were published (bounded twin)."""
    total = 0
    while n := await publish_batch(pool, targets, batch_size, confirm_timeout=confirm_timeout,
                                   batch_bytes=batch_bytes):
        total += n
    return total


async def refresh_backlog(pool: db.Pool) -> outbox.Backlog:
    """Set the outbox gauges from one cheap query."""
    backlog = await outbox.backlog(pool)
    metrics.OUTBOX_PENDING.set(backlog.pending)
    metrics.OUTBOX_OLDEST_AGE.set(backlog.oldest_age_seconds)
    return backlog

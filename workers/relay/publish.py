"""One relay batch, one transaction: claim outbox rows, publish them with confirms, delete them, commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractExchange
from pamqp import commands as spec

from store import db, outbox, tracing
from store import errors as store_errors
from workers import broker
from workers.errors import BrokerUnavailable, PublishFailed
from workers.runtime import metrics

logger = logging.getLogger(__name__)


async def publish_confirmed(exchange: AbstractExchange, messages: Sequence[tuple[str, aio_pika.Message]],
                            confirm_timeout: float) -> None:
    """Publish (routing key, message) pairs pipelined, then wait for every confirm; raise unless all acked.

    Every publish is started before any confirm is awaited: one round trip per batch, not per message.
    The channel must have publisher confirms and ``on_return_raises`` (a basic.return then raises
    ``PublishError``; without it aio-pika would return the DeliveredMessage instead of an Ack).
    """
    try:
        async with asyncio.timeout(confirm_timeout):
            results = await asyncio.gather(
                *(exchange.publish(m, routing_key=key, mandatory=True) for key, m in messages),
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
    """The (routing key, message) of every claimed row, and the rows whose event could not be encoded.

    A row whose metadata is not a msgpack map (written around the store's API) must not stop the relay:
    every row behind it would wait forever. It is published anyway, flagged (see
    ``broker.encode_undecodable_row``), so each projection dead-letters it and the store keeps the truth.
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


async def publish_batch(pool: db.Pool, exchange: AbstractExchange, batch_size: int, *,
                        confirm_timeout: float = 30.0) -> int:
    """Claim up to batch_size rows, publish them, delete them after every confirm, commit; return the count."""
    async with db.translate_errors(), pool.acquire() as conn, conn.transaction():
        rows = await outbox.claim(conn, batch_size)
        if not rows:
            return 0
        messages, undecodable = encode_rows(rows)
        with metrics.RELAY_BATCH_SECONDS.time(), tracing.publish_span(
                exchange.name, len(messages), (m.headers for _, m in messages)):
            await publish_confirmed(exchange, messages, confirm_timeout)
        await outbox.delete(conn, [r["global_position"] for r in rows])
    metrics.RELAY_PUBLISHED.inc(len(rows))
    for row, reason in undecodable:  # once committed: a rolled-back batch publishes them again
        logger.error("published an event that cannot be decoded, flagged for the dead letters", extra={
            "event_id": str(row["event_id"]), "stream_id": row["stream_id"], "version": row["version"],
            "event_type": row["event_type"], "error": reason})
    metrics.RELAY_UNDECODABLE.inc(len(undecodable))
    logger.debug("batch published", extra={"events": len(rows), "last_position": rows[-1]["global_position"]})
    return len(rows)


async def relay_until_idle(pool: db.Pool, exchange: AbstractExchange, *, batch_size: int = 1000,
                           confirm_timeout: float = 30.0) -> int:
    """Publish batches until a claim finds nothing; return how many events were published (bounded twin)."""
    total = 0
    while n := await publish_batch(pool, exchange, batch_size, confirm_timeout=confirm_timeout):
        total += n
    return total


async def refresh_backlog(pool: db.Pool) -> outbox.Backlog:
    """Set the outbox gauges from one cheap query."""
    backlog = await outbox.backlog(pool)
    metrics.OUTBOX_PENDING.set(backlog.pending)
    metrics.OUTBOX_OLDEST_AGE.set(backlog.oldest_age_seconds)
    return backlog

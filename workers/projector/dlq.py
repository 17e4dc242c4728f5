"""Copies of parked events in the DLQ, published on a RabbitMQ connection of their own, behind the acks.

A parked event's row in ``dead_letters`` commits with its batch: that is the record, and what ``dead-letters``
lists, shows and re-drives. The copy in ``{prefix}.{projection}.dlq`` is for people and tools that read
queues. It is published here, on a connection that does nothing else, and never on a consumer's: when the
broker raises a memory or disk alarm it blocks every connection that publishes (``connection.blocked``) and
stops reading from it, so a consumer's own publish would hold its acks (and every later delivery of the
channel) until the alarm clears. Consumers hand copies over without waiting (``put``) and ack at once; the
copies go out in order, with publisher confirms, retried through broker outages; a copy that cannot go out
before the process stops is logged, not kept (its dead letter is in the table).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange

from workers import broker
from workers.runtime import amqp, retry

logger = logging.getLogger(__name__)

#: Copies waiting to be published; beyond it a copy is dropped with a warning (the table keeps the dead letter).
MAX_PENDING = 10_000
#: Seconds ``close`` waits for the copies still pending (a broker alarm can hold them for ever).
CLOSE_SECONDS = 5.0


class DeadLetterCopies:
    """One process's (or one consumer's) publisher of DLQ copies; connects on the first copy."""

    def __init__(self, urls: Sequence[str], prefix: str, *, name: str = "eventfleet dead-letter copies") -> None:
        self.urls, self.name = list(urls), name
        self.exchange_name = broker.Names(prefix).dead_letter_exchange
        self.connection: AbstractConnection | None = None
        self.published = 0
        self.unsent = 0  # handed over, neither published nor given up yet
        self._pending: asyncio.Queue[tuple[str, aio_pika.Message]] = asyncio.Queue(MAX_PENDING)
        self._task: asyncio.Task[None] | None = None

    def put(self, projection: str, message: aio_pika.Message) -> None:
        """Hand a copy over (routed to ``projection``'s DLQ); never waits."""
        try:
            self._pending.put_nowait((projection, message))
        except asyncio.QueueFull:
            logger.warning("DLQ copy dropped: too many pending (its dead letter is in the table)",
                           extra={"projection": projection, "message_id": message.message_id})
            return
        self.unsent += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dead-letter copies")

    async def close(self, wait_seconds: float = CLOSE_SECONDS) -> None:
        """Publish what is pending, waiting up to ``wait_seconds``; then stop and close the connection."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pending.join(), wait_seconds)
            left = self.unsent
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *retry.OUTAGE_ERRORS):
                await self._task
            self._task = None
            if left:
                logger.warning("DLQ copies not published (their dead letters are in the table)",
                               extra={"copies": left})
            while not self._pending.empty():
                self._pending.get_nowait()
                self._pending.task_done()
            self.unsent = 0
        await self._disconnect()

    async def _run(self) -> None:
        """Publish the pending copies in order; through a broker outage, reconnect and go on."""
        exchange: AbstractExchange | None = None
        while True:
            projection, message = await self._pending.get()
            try:
                async for attempt in retry.retry_forever():
                    with attempt:
                        try:
                            if exchange is None or self.connection is None or self.connection.is_closed:
                                exchange = await self._connect()
                            await exchange.publish(message, routing_key=projection)
                        except retry.OUTAGE_ERRORS as exc:
                            logger.debug("DLQ copy not published yet",
                                         extra={"error": f"{type(exc).__name__}: {exc}"})
                            exchange = None
                            await self._disconnect()
                            raise
                self.published += 1
            except Exception as exc:  # noqa: BLE001 - not an outage (e.g. no DLQ to route to): this copy only
                logger.warning("DLQ copy not published (its dead letter is in the table)", extra={
                    "projection": projection, "message_id": message.message_id,
                    "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self.unsent -= 1
                self._pending.task_done()

    async def _connect(self) -> AbstractExchange:
        self.connection = await amqp.connect(self.urls, name=self.name)
        channel = await self.connection.channel()  # publisher confirms: published means in the DLQ
        return await channel.get_exchange(self.exchange_name, ensure=False)

    async def _disconnect(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_SECONDS)

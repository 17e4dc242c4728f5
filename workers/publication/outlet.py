"""Where publications' messages go: a topic exchange, on a connection of their own, with publisher confirms.

One outlet per publication per worker process, shared by every partition's consumer of it (their batches
publish on the one channel, each awaiting its own confirms). It connects on first use and again after any
failure; a failure raises ``PublishUnavailable`` (a ``TransientError``), so the batch's transaction is rolled
back and retried as a whole, never parked: the messages it published before the failure go out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Sequence

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from projections.publication import Outgoing, Outlet, Publication, PublishUnavailable
from workers import broker
from workers.config import Settings
from workers.errors import BrokerUnavailable, PublishFailed
from workers.relay.publish import publish_confirmed
from workers.runtime import amqp, metrics

logger = logging.getLogger(__name__)

#: Seconds a batch's confirms may take before the broker counts as unavailable (the relay's too).
CONFIRM_SECONDS = 30.0


def message_of(outgoing: Outgoing) -> aio_pika.Message:
    """The AMQP message of an outgoing integration event (persistent; properties per docs/reference.md)."""
    return aio_pika.Message(
        outgoing.body, content_type=outgoing.content_type, headers=dict(outgoing.headers),
        message_id=outgoing.message_id, type=outgoing.type or None, timestamp=outgoing.timestamp,
        correlation_id=outgoing.correlation_id, app_id="eventfleet",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


class AmqpOutlet:
    """A publication's outlet: see the module doc."""

    def __init__(self, urls: Sequence[str], exchange: str, publication: str, *,
                 confirm_seconds: float = CONFIRM_SECONDS) -> None:
        self.urls, self.exchange_name, self.publication = tuple(urls), exchange, publication
        self.confirm_seconds = confirm_seconds
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _opened(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
                return self._exchange
            await self._drop()
            name = f"eventfleet publication {self.publication} {socket.gethostname()}:{os.getpid()}"
            self._connection = await amqp.connect(self.urls, name=name)
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=False)
            self._exchange = await self._channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
            return self._exchange

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish the messages in order and wait for every confirm (routing: their public type; a message no
        queue is bound for is dropped by the broker, as a topic exchange does)."""
        try:
            exchange = await self._opened()
            await publish_confirmed(exchange, [(m.routing_key, message_of(m)) for m in messages],
                                    self.confirm_seconds, mandatory=False)
        except (BrokerUnavailable, PublishFailed, aiormq.exceptions.AMQPError, ConnectionError, OSError,
                RuntimeError) as exc:
            async with self._lock:
                await self._drop()
            raise PublishUnavailable(f"publication {self.publication}: {type(exc).__name__}: {exc}") from exc
        metrics.PUBLISHED.labels(self.publication).inc(len(messages))

    async def _drop(self) -> None:
        connection, self._connection, self._channel, self._exchange = self._connection, None, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


@dataclasses.dataclass(frozen=True, slots=True)
class Runtime:
    """What a worker of these settings gives the subscribers it runs (``projections.base.Runtime``)."""

    settings: Settings

    @property
    def deployment(self) -> str:
        return self.settings.prefix

    async def outlet(self, publication: Publication) -> Outlet:
        return AmqpOutlet(self.settings.amqp_urls, exchange_of(publication, self.settings.prefix), publication.name)


def exchange_of(publication: Publication | type[Publication], prefix: str) -> str:
    """The exchange a publication publishes to in the deployment of ``prefix``."""
    if publication.exchange is None:
        return broker.Names(prefix).integration_exchange
    return publication.exchange.replace("{prefix}", prefix)

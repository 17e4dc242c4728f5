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
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp import commands as spec

from projections.publication import Outgoing, Outlet, Publication, PublishUnavailable
from workers import broker
from workers.config import Settings
from workers.errors import BrokerUnavailable, PublishFailed
from workers.publication import frames
from workers.runtime import amqp, metrics

logger = logging.getLogger(__name__)

#: Seconds a batch's confirms may take before the broker counts as unavailable (the relay's too).
CONFIRM_SECONDS = 30.0


def properties_of(outgoing: Outgoing) -> spec.Basic.Properties:
    """The AMQP properties of an outgoing integration event (persistent; per docs/reference.md)."""
    return spec.Basic.Properties(
        content_type=outgoing.content_type, headers=dict(outgoing.headers), message_id=outgoing.message_id,
        message_type=outgoing.type or None, timestamp=outgoing.timestamp, correlation_id=outgoing.correlation_id,
        app_id="eventfleet", delivery_mode=2)


class AmqpOutlet:
    """A publication's outlet: see the module doc."""

    def __init__(self, urls: Sequence[str], exchange: str, publication: str, *,
                 confirm_seconds: float = CONFIRM_SECONDS) -> None:
        self.urls, self.exchange_name, self.publication = tuple(urls), exchange, publication
        self.confirm_seconds = confirm_seconds
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        #: Whether the channel takes a batch's frames in one write (``frames.supported``), known once it opens.
        self._batched = False
        self._lock = asyncio.Lock()

    async def _opened(self) -> aiormq.abc.AbstractChannel:
        async with self._lock:
            if self._raw is not None and self._channel is not None and not self._channel.is_closed:
                return self._raw
            await self._drop()
            name = f"eventfleet publication {self.publication} {socket.gethostname()}:{os.getpid()}"
            self._connection = await amqp.connect(self.urls, name=name)
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=False)
            await self._channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
            # Published on the underlying aiormq channel, as the consumers take deliveries: aio-pika's message
            # and exchange objects cost more per message than the publish does.
            self._raw = await self._channel.get_underlay_channel()
            self._batched = frames.supported(self._raw)
            return self._raw

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish the messages in order, their frames in one write (``frames.publish_batch``), and wait for
        every confirm (routing: their public type; a message no queue is bound for is dropped by the broker, as
        a topic exchange does)."""
        try:
            raw = await self._opened()
            async with asyncio.timeout(self.confirm_seconds):
                if self._batched:
                    futures = await frames.publish_batch(raw, self.exchange_name, messages)
                    confirms = await asyncio.gather(*futures, return_exceptions=True)
                else:
                    confirms = await asyncio.gather(*(
                        raw.basic_publish(m.body, exchange=self.exchange_name, routing_key=m.routing_key,
                                          properties=properties_of(m)) for m in messages), return_exceptions=True)
            for confirm in confirms:
                if isinstance(confirm, BaseException):
                    raise confirm
                if not isinstance(confirm, spec.Basic.Ack):
                    raise PublishFailed(f"the broker did not ack a message: {confirm!r}")
        except (TimeoutError, PublishFailed, aiormq.exceptions.AMQPError, ConnectionError, OSError,
                RuntimeError, BrokerUnavailable) as exc:
            async with self._lock:
                await self._drop()
            raise PublishUnavailable(f"publication {self.publication}: {type(exc).__name__}: {exc}") from exc
        metrics.PUBLISHED.labels(self.publication).inc(len(messages))

    async def _drop(self) -> None:
        connection, self._connection, self._channel, self._raw = self._connection, None, None, None
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

"""A worker group's partition queue feeding every read model of the group: one consumer on the broker, a view of it
per read model (docs/reference.md 6.0, topology (2)).

With ``EVENTFLEET_GROUP`` set, the relay's batch messages of partition p go to one queue per worker group,
``{prefix}.group.{group}.{p}``, however many read models the group runs: the broker's queues, copies and file handles
do not grow with the read models. The worker holding the group's lease of p consumes that queue once
(``GroupFeed``) and hands every delivery to each read model's ``Consumer`` through a ``View``: the consumer is the
one a queue of its own would feed (decode of its types only, catch-up, deadlines, holds, the apply step, its acks
after commit), and the view is the channel it sees. A read model's ack or reject settles the delivery for that read
model; the feed acks the broker (one multiple-ack) up to the last delivery every read model of the group settled, so
a delivery is acked once every read model committed its share, and a redelivery after a partial commit is a
duplicate to those that committed (their checkpoints say so). What a read model rejects (undecodable, or naming what
the store lacks: its ``dead_letters`` row is recorded by the apply step) is copied to that read model's DLQ on the
worker's copies connection instead of going through the queue's dead-letter exchange, which would take it from the
others.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel
from pamqp import commands as spec

from workers.projector import dlq

logger = logging.getLogger(__name__)

Receive = Callable[[aiormq.abc.DeliveredMessage], Awaitable[None]]


@dataclasses.dataclass(slots=True)
class _Settled:
    """One read model's settled deliveries: every tag up to ``upto``, and single tags above it."""

    upto: int = 0
    singles: set[int] = dataclasses.field(default_factory=set)

    def settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.upto = max(self.upto, tag)
            self.singles = {t for t in self.singles if t > self.upto}
        elif tag > self.upto:
            self.singles.add(tag)
        while self.upto + 1 in self.singles:
            self.singles.remove(self.upto + 1)
            self.upto += 1


class GroupFeed:
    """One partition queue of a worker group on one channel, dispatched to a view per read model."""

    def __init__(self, channel: AbstractChannel, queue: str, projections: Sequence[str], *, group: str,
                 prefetch: int, copies: dlq.DeadLetterCopies) -> None:
        self.channel, self.queue, self.group, self.prefetch, self.copies = channel, queue, group, prefetch, copies
        self.views = {name: View(self, name) for name in projections}
        self._receivers: dict[str, Receive] = {}
        self._settled = {name: _Settled() for name in projections}
        self._acked = 0
        #: Deliveries not yet acked to the broker, by tag: a read model's reject copies the message to its DLQ.
        self._pending: dict[int, aiormq.abc.DeliveredMessage] = {}
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._consumer_tag: str | None = None

    async def open(self) -> None:
        """Set the channel's prefetch (in messages): what the group holds unacked, for all its read models."""
        if self._raw is None:
            await self.channel.set_qos(prefetch_count=self.prefetch)
            self._raw = await self.channel.get_underlay_channel()

    async def register(self, projection: str, receive: Receive) -> str:
        """A read model's consumer starts; once every read model's did, the queue is consumed."""
        await self.open()
        assert self._raw is not None
        self._receivers[projection] = receive
        if self._consumer_tag is None and len(self._receivers) == len(self.views):
            ok = await self._raw.basic_consume(self.queue, self._receive, no_ack=False)
            assert ok.consumer_tag is not None
            self._consumer_tag = ok.consumer_tag
        return f"{projection}@{self.queue}"

    async def _receive(self, message: aiormq.abc.DeliveredMessage) -> None:
        tag = message.delivery_tag
        assert tag is not None
        self._pending[tag] = message
        for receive in self._receivers.values():
            await receive(message)

    async def settle(self, projection: str, tag: int, *, multiple: bool) -> None:
        """A read model settled deliveries; ack the broker up to the last one every read model settled."""
        self._settled[projection].settle(tag, multiple)
        upto = min(s.upto for s in self._settled.values())
        if upto <= self._acked:
            return
        self._acked = upto
        for done in [t for t in self._pending if t <= upto]:
            del self._pending[done]
        assert self._raw is not None
        await self._raw.basic_ack(upto, multiple=True)

    async def reject(self, projection: str, tag: int) -> None:
        """A read model dead-lettered a delivery whole: a copy goes to its DLQ, and the delivery is settled for it."""
        message = self._pending.get(tag)
        if message is not None:
            properties = message.header.properties
            self.copies.put(projection, aio_pika.Message(
                message.body, headers={**(properties.headers or {}), "x-eventfleet-group": self.group},
                content_type=properties.content_type, message_id=properties.message_id, type=properties.message_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        await self.settle(projection, tag, multiple=False)

    async def cancel(self, projection: str) -> None:
        """A read model's consumer stops: once every one did, the queue's consumer is cancelled (what the channel
        holds unacked returns to the queue when it closes)."""
        self._receivers.pop(projection, None)
        if not self._receivers and self._consumer_tag is not None and self._raw is not None \
                and not self.channel.is_closed:
            tag, self._consumer_tag = self._consumer_tag, None
            await self._raw.basic_cancel(tag)

    async def ready(self) -> int:
        """Messages ready in the group's queue."""
        await self.open()
        assert self._raw is not None
        return (await self._raw.queue_declare(self.queue, passive=True)).message_count or 0


class View:
    """The channel one read model's ``Consumer`` sees: its deliveries are the group queue's, its acks and rejects
    settle them for this read model only (``GroupFeed``)."""

    def __init__(self, feed: GroupFeed, projection: str) -> None:
        self.feed, self.projection = feed, projection

    # --- what the consumer asks of its channel -------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self.feed.channel.is_closed

    @property
    def close_callbacks(self) -> Any:
        return self.feed.channel.close_callbacks

    async def set_qos(self, prefetch_count: int) -> None:
        """The feed's channel holds the group's prefetch (``GroupFeed.open``)."""
        await self.feed.open()

    async def get_underlay_channel(self) -> View:
        return self

    async def close(self) -> None:
        if not self.feed.channel.is_closed:
            await self.feed.channel.close()

    # --- what the consumer asks of the underlying channel --------------------------------------------------

    async def basic_consume(self, queue: str, consumer_callback: Receive, *, no_ack: bool = False) -> spec.Basic.ConsumeOk:
        del queue, no_ack  # the group's queue, acked by the feed
        return spec.Basic.ConsumeOk(consumer_tag=await self.feed.register(self.projection, consumer_callback))

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        await self.feed.settle(self.projection, delivery_tag, multiple=multiple)

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        del requeue  # never requeued: dead-lettered for this read model
        await self.feed.reject(self.projection, delivery_tag)

    async def basic_cancel(self, consumer_tag: str) -> None:
        del consumer_tag
        await self.feed.cancel(self.projection)

    async def queue_declare(self, queue: str, *, passive: bool = False) -> spec.Queue.DeclareOk:
        del queue, passive
        return spec.Queue.DeclareOk(queue=self.feed.queue, message_count=await self.feed.ready(), consumer_count=1)

"""Deliveries as a consumer receives them: each batch message's body decoded once per process.

``Delivery``: one delivery's tag, body and decoded batch (or why it cannot be decoded). ``DecodeCache``: the
bodies decoded recently, shared by a worker's consumers (every projection's queue of a partition gets its own
copy of each batch message).
"""

from __future__ import annotations

import dataclasses

from store import codec
from workers import broker, errors
from workers.config import Settings


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery as received: its tag on the channel, raw body, and the decoded batch or why not."""

    tag: int
    body: bytes
    message_id: str | None
    decoded: broker.Batch | errors.MalformedMessage

    @property
    def events(self) -> int:
        return 0 if isinstance(self.decoded, errors.MalformedMessage) else len(self.decoded.events)


class DecodeCache:
    """Recently decoded batch bodies, shared by the consumers of one process: every projection's queue of a
    partition gets its own copy of each batch, and decoding is the largest cost per event. Events are immutable.
    Bounded in bytes, not entries (256 bodies of a megabyte would not fit a pod): a kept batch costs its body and
    what decoding it made, counted as its events' data twice (the bytes unpacked from the body, and the payload
    decoded from them: for a 1 MiB event, 3 MiB in all, where counting the body alone let a 16 MiB budget hold
    48); one costing over a quarter of the budget is not kept. Bodies over ``max_message_bytes`` are refused as malformed: a
    worker takes what the broker can deliver (EVENTFLEET_BROKER_MAX_MESSAGE_BYTES), so a message published under
    larger limits than today's (events stored before EVENTFLEET_MAX_PAYLOAD_BYTES was lowered) is still applied,
    not dead-lettered with the events it carries. A batch holding personal fields is never kept: its values in
    the clear would outlive a ``forget`` (each consumer decodes it with the store's keys, whose cache the
    reference bounds by ``key_cache_seconds``)."""

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, *, max_message_bytes: int = broker.MAX_MESSAGE_BYTES
                 ) -> None:
        self.max_bytes, self.largest, self.max_message_bytes = max_bytes, max_bytes // 4, max_message_bytes
        self.bytes = 0  # the cached bodies' length
        #: Per body and the event names decoded (None: all; a read model that handles a few names decodes only
        #: those, and read models of the same names share it): the batch and what it costs (``cost``).
        self._batches: dict[tuple[frozenset[str] | None, bytes], tuple[broker.Batch, int]] = {}

    @classmethod
    def of(cls, settings: Settings) -> DecodeCache:
        """The cache a worker of these settings keeps (EVENTFLEET_DECODE_CACHE_BYTES)."""
        return cls(settings.decode_cache_bytes, max_message_bytes=settings.broker_max_message_bytes)

    def decode(self, body: bytes, registry: codec.Registry, names: frozenset[str] | None = None) -> broker.Batch:
        """The batch of a body, its events of ``names`` only when given; raises MalformedMessage (never cached)
        like ``broker.from_batch_body``."""
        kept = self._batches.get((names, body))
        if kept is not None:
            return kept[0]
        batch = broker.from_batch_body(body, registry, max_bytes=self.max_message_bytes, names=names)
        cost = self.cost(body, batch)
        if cost > self.largest or any(registry.personal(type(e.event)) for e in batch.events):
            return batch
        self._batches[(names, body)] = (batch, cost)
        self.bytes += cost
        while self.bytes > self.max_bytes:  # the oldest first: dicts keep insertion order
            oldest = next(iter(self._batches))
            self.bytes -= self._batches.pop(oldest)[1]
        return batch

    @staticmethod
    def cost(body: bytes, batch: broker.Batch) -> int:
        """What keeping a decoded batch holds: its body, and its events' data twice (unpacked, and decoded)."""
        return len(body) + 2 * sum(len(e.data) for e in batch.events)

"""``every_event_legacy``: every event in the per-event exchange's old message format, on ``{prefix}.events``.

For the consumers of ``EVENTFLEET_EVENTS_EXCHANGE=1`` while they move to a publication of their own
(docs/reference.md, "The per-event exchange"): the same exchange, routing key (the event type), body (a msgpack
map of the event: ``workers.broker.to_message``), properties and headers as the relay wrote them, published by
the workers with the publications' guarantees (per-stream order, checkpoints, republish). Loaded with
``EVENTFLEET_PROJECTION_MODULES=workers.publication.every_event_legacy``, with the relay's option off.
"""

from __future__ import annotations

from typing import ClassVar

from projections.publication import Outgoing
from projections.registry import register
from store.records import RecordedEvent
from workers import broker
from workers.publication.every_event import EveryEventBase


@register
class EveryEventLegacy(EveryEventBase):
    """Every event, in the per-event message format, to ``{prefix}.events`` (see the module doc)."""

    name = "every_event_legacy"
    exchange: ClassVar[str | None] = "{prefix}.events"

    def outgoing(self, event: RecordedEvent) -> Outgoing | None:
        message = broker.to_message(event)
        return Outgoing(event.event_type, str(event.event_id), "", message.content_type, dict(message.headers or {}),
                        message.body, event.recorded_at, message.correlation_id)

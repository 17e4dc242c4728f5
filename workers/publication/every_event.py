"""``every_event``: a publication of every event, the successor of ``EVENTFLEET_EVENTS_EXCHANGE=1``.

Loaded with ``EVENTFLEET_PROJECTION_MODULES=workers.publication.every_event``: every event of the store, as a
CloudEvents message (docs/reference.md, "Integration events") whose type is the event's own (``OrderPlaced.v2``,
also the routing key) and whose JSON body is the payload's fields (decimals and ids as strings, times in
ISO 8601), on ``{prefix}.integration``. Unlike the relay's per-event exchange it keeps each stream in order
whatever the number of relays, is checkpointed (pause, lag, republish) and costs the relay nothing; like it, it
ships the internal event's fields, so its consumers depend on our event classes: a publication of your own,
mapping each event to a public contract, is the better answer.

``workers.publication.every_event_legacy`` is the same with the per-event exchange's old message format, for
its existing consumers.
"""

from __future__ import annotations

from projections.publication import Public, Publication
from projections.registry import register
from store.records import RecordedEvent


class EveryEventBase(Publication):
    """Every event, its payload's fields as the body (not registered: its two subclasses are)."""

    name = "every_event"
    all_events = True

    def public(self, event: RecordedEvent) -> Public | None:
        name, _, version = event.event_type.rpartition(".v")
        return Public(name, int(version), event.event)


@register
class EveryEvent(EveryEventBase):
    """Every event on ``{prefix}.integration`` (see the module doc)."""

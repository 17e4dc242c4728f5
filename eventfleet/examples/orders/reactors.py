"""The orders example's reactor: ``payment_timeout`` cancels orders left unpaid.

An ``OrderPlaced`` schedules a deadline under the order's stream id, due ``TIMEOUT`` after the placement was
recorded; ``OrderPaid`` or ``OrderCancelled`` cancels it. When it fires, the order is cancelled with reason
``"payment timeout"`` through the repository, inside the transaction that removes the deadline. A payment
racing the timeout is decided by the aggregate's version: whichever append comes second meets a version
conflict, reloads, and finds the order paid (the cancel is refused: recorded in ``reactor_refusals``) or
cancelled (the payment is refused to the writer).

Loaded with ``EVENTFLEET_PROJECTION_MODULES=eventfleet.examples.orders.reactors``. The timeout is
``EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS`` (default 900), read once at import: the demo shortens it.
"""

from __future__ import annotations

import datetime as dt
import os

from eventfleet.examples.orders import orders
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from projections.base import handles
from projections.reactor import Deadline, Effects, Reactor
from projections.registry import register
from store.records import RecordedEvent

#: How long an order may stay unpaid.
TIMEOUT = dt.timedelta(seconds=float(os.environ.get("EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS", "900")))
#: The reason the timeout's cancellation gives.
REASON = "payment timeout"


@register
class PaymentTimeout(Reactor):
    """Cancels orders not paid within ``TIMEOUT`` of their placement."""

    name = "payment_timeout"
    timeout = TIMEOUT

    @handles(OrderPlaced)
    async def placed(self, fx: Effects, event: RecordedEvent) -> None:
        await fx.schedule(event.recorded_at + self.timeout, event.stream_id)

    @handles(OrderPaid, OrderCancelled)
    async def settled(self, fx: Effects, event: RecordedEvent) -> None:
        await fx.cancel(event.stream_id)

    async def on_deadline(self, fx: Effects, deadline: Deadline) -> None:
        await fx.execute(deadline.key, orders.Order, orders.cancel_unpaid(REASON))

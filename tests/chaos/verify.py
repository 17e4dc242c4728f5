"""The oracle: every read model compared with a fold of the store, and lost or doubled events counted."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from store import EventStore, RecordedEvent
from store.queries import load
from store.records import record_from_row
from tests.unit.test_projection_fold import fold, read_models

LEDGER = load("tests.chaos", "ledger.sql")
#: The reason payment_timeout's cancellations give (eventfleet.examples.orders.reactors.REASON; not imported:
#: that would register the reactor in this process).
TIMEOUT_REASON = "payment timeout"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How the read models differ from the fold of the store (all zero when exact)."""

    events: int
    lost: int  # events of the store missing from the worst read model (ledger or customer_stats counters)
    doubled: int  # events the worst read model applied more than once
    summary_mismatches: list[str]  # order_summary rows that differ, are missing or extra
    stats_mismatches: list[str]  # customer_stats rows (every counter) that differ, are missing or extra
    #: payment_timeout: orders it cancelled, unpaid orders it has not (yet), and follow-ups it doubled
    #: (a deadline id as the causation of two events, or an order cancelled by its timeout twice).
    timeouts: int = 0
    timeouts_missing: int = 0
    follow_ups_doubled: int = 0

    @property
    def exact(self) -> bool:
        return not (self.lost or self.doubled or self.summary_mismatches or self.stats_mismatches
                    or self.timeouts_missing or self.follow_ups_doubled)


async def all_events(store: EventStore) -> list[RecordedEvent]:
    """Every event of the store, each stream in version order. Not ``read_all``: that stops at the oldest
    transaction running anywhere in the cluster (other tests' too), while the writes here are over."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(LEDGER["all_events"])
    return [record_from_row(r, store.registry) for r in rows]


def _diff(name: str, expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(expected.keys() | actual.keys()):
        if expected.get(key) != actual.get(key):
            out.append(f"{name}[{key}]: store says {expected.get(key)}, read model has {actual.get(key)}")
    return out


async def verify(store: EventStore) -> Verdict:
    """Fold the store and compare: order_summary rows exactly, every customer_stats counter exactly, and
    the chaos ledger's per-stream event counts (the exact measure of lost and doubled events)."""
    events = await all_events(store)
    expected = fold(e.event for e in events)
    async with store.pool.acquire() as conn:
        actual = await read_models(conn)
        ledger = {r["stream_id"]: r["events"] for r in await conn.fetch(LEDGER["ledger"])}
        counts = {r["stream_id"]: r["events"] for r in await conn.fetch(LEDGER["store_counts"])}
        shipments = {r["stream_id"]: r["events"] for r in await conn.fetch(LEDGER["shipments"])}
        shipped = {r["stream_id"]: r["events"] for r in await conn.fetch(LEDGER["store_shipments"])}
    ledger_lost = ledger_doubled = stats_lost = stats_doubled = 0
    for applied, stored in ((ledger, counts), (shipments, shipped)):  # every event; the one-type ledger's
        for stream in applied.keys() | stored.keys():
            delta = applied.get(stream, 0) - stored.get(stream, 0)
            ledger_lost, ledger_doubled = ledger_lost + max(0, -delta), ledger_doubled + max(0, delta)
    # customer_stats counts placements and cancellations one per event: a difference is a number of events.
    for customer in expected.customer_stats.keys() | actual.customer_stats.keys():
        want = expected.customer_stats.get(customer, (0, 0, Decimal(0)))
        have = actual.customer_stats.get(customer, (0, 0, Decimal(0)))
        for delta in (have[0] - want[0], have[1] - want[1]):
            stats_lost, stats_doubled = stats_lost + max(0, -delta), stats_doubled + max(0, delta)
    lost, doubled = max(ledger_lost, stats_lost), max(ledger_doubled, stats_doubled)
    timeouts, missing, doubled_follow_ups = _timeouts(events)
    return Verdict(
        events=len(events), lost=lost, doubled=doubled,
        summary_mismatches=_diff("order_summary", expected.order_summary, actual.order_summary),
        stats_mismatches=_diff("customer_stats", expected.customer_stats, actual.customer_stats),
        timeouts=timeouts, timeouts_missing=missing, follow_ups_doubled=doubled_follow_ups,
    )


def _timeouts(events: list[RecordedEvent]) -> tuple[int, int, int]:
    """payment_timeout's follow-ups against the store: (orders it cancelled, orders left unpaid and not cancelled
    by it, follow-ups doubled). Every order placed and neither paid nor cancelled otherwise must have exactly
    one timeout cancellation, caused by one deadline each."""
    settled: set[str] = set()
    placed: set[str] = set()
    per_stream: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for event in events:
        if isinstance(event.event, OrderCancelled) and event.event.reason == TIMEOUT_REASON:
            per_stream[event.stream_id] += 1
            causes[str(event.metadata.get("causation_id"))] += 1
        elif isinstance(event.event, OrderPaid | OrderCancelled):
            settled.add(event.stream_id)
        elif isinstance(event.event, OrderPlaced):
            placed.add(event.stream_id)
    missing = len(placed - settled - set(per_stream))
    doubled = sum(n - 1 for n in per_stream.values() if n > 1) + sum(n - 1 for n in causes.values() if n > 1)
    return len(per_stream), missing, doubled

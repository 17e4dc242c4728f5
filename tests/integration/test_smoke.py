from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from eventfleet.examples.orders.events import OrderPaid
from store import NO_STREAM, Position, VersionConflict
from tests.integration.test_read_all import read_until


async def test_append_then_read_all_and_load(event_store):
    now = dt.datetime.now(dt.UTC)
    r = await event_store.append("order-1", [OrderPaid("1", "c", Decimal("1.50"), now)], NO_STREAM)
    assert r.first_version == 0
    assert r.last_version == 0
    # Any writing transaction in the cluster holds read_all back for a while: poll, as readers do.
    events = await read_until(event_store, Position.START, lambda read: len(read) >= 1)
    assert [e.event for e in events] == [OrderPaid("1", "c", Decimal("1.50"), now)]
    with pytest.raises(VersionConflict) as info:
        await event_store.append("order-1", [OrderPaid("1", "c", Decimal("1.50"), now)], NO_STREAM)
    assert (info.value.expected, info.value.actual) == (-1, 0)
    rs = await event_store.append_batch([("order-1", [OrderPaid("1", "c", Decimal(2), now)], 0),
                                         ("order-2", [OrderPaid("2", "c", Decimal(3), now)] * 2, -1)])
    assert [(x.first_version, x.last_version) for x in rs] == [(1, 1), (0, 1)]
    assert len(await event_store.load("order-2")) == 2

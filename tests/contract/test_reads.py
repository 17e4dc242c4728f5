"""read_all on every store: each event once, in commit order, paged by the last position."""

from __future__ import annotations

import pytest

from store import NO_STREAM, Position
from tests.contract.test_appends import paid
from tests.integration.test_read_all import read_until


async def test_paging_with_the_last_position_reads_every_event_once_in_commit_order(event_store):
    await event_store.append_batch([(f"b{n}", [paid(n), paid(n + 100)], NO_STREAM) for n in range(5)])
    for n in range(30):
        await event_store.append(f"s{n % 7}", [paid(n)], (n // 7) - 1)
    everything = await read_until(event_store, Position.START, lambda read: len(read) >= 40)
    assert len(everything) == 40
    assert len({e.event_id for e in everything}) == 40
    positions = [e.position for e in everything]
    assert positions == sorted(positions)
    assert all(e.position == Position(e.position.transaction_id, e.global_position) for e in everything)
    assert len({e.position.transaction_id for e in everything[:10]}) == 1  # one batch, one transaction
    assert await event_store.read_all(everything[-1].position) == []
    with pytest.raises(ValueError, match="limit"):
        await event_store.read_all(limit=0)


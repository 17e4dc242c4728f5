"""The write model against PostgreSQL itself: snapshots changed behind the store's back, a lost commit
acknowledgement. What holds on every store is in tests/contract/test_repository.py."""

from __future__ import annotations

import pytest

from store import (
    EventStore,
    Repository,
    db,
)
from tests.contract.counters import REG, Counter, CounterState, increment


@pytest.fixture
def counters(pool: db.Pool, schema: str) -> EventStore:
    return EventStore(pool, schema=schema, registry=REG)


async def test_snapshots_are_taken_every_n_events_and_loading_reads_only_the_tail(counters, pool):
    repository = Repository(counters, Counter, snapshot_every=3)
    for w in range(7):
        await repository.execute("c", increment(w))
    snapshot = await counters.load_snapshot("c")
    assert (snapshot.version, snapshot.state) == (5, CounterState(6))  # taken after versions 2 and 5
    # Make the snapshot disagree with the events: only a load that trusts it and reads the tail sees 1001.
    _, data = REG.encode(CounterState(1000))
    await pool.execute("UPDATE snapshots SET data = $1 WHERE stream_id = 'c'", data)
    loaded = await repository.load("c")
    assert (loaded.version, loaded.count) == (6, 1001)
    without = await Repository(counters, Counter).load("c")  # snapshots off: a full replay
    assert (without.version, without.count) == (6, 7)


async def test_an_unreadable_snapshot_is_ignored_and_the_stream_replayed(counters, pool):
    repository = Repository(counters, Counter, snapshot_every=2)
    for w in range(4):
        await repository.execute("c", increment(w))
    await pool.execute("UPDATE snapshots SET snapshot_type = 'Gone.v1' WHERE stream_id = 'c'")
    loaded = await repository.load("c")
    assert (loaded.version, loaded.count) == (3, 4)



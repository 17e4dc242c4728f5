"""The store contract: every test here runs against EventStore (PostgreSQL) and InMemoryEventStore.

``event_store`` is the store of the test, ``counters`` one for the counter aggregate's events;
``new_store(**options)`` makes another one with other options (``registry``, ``max_payload_bytes``).
The PostgreSQL stores of one test share a fresh schema; each in-memory store is a world of its own, and
the memory runs need no database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from store import EventStore, InMemoryEventStore, Store
from tests.contract.counters import REG
from tests.unit.test_validation import NoPool

StoreFactory = Callable[..., Store]
Written = Callable[[], Awaitable[int]]


@pytest.fixture(params=["postgres", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_store(kind: str, request: pytest.FixtureRequest) -> StoreFactory:
    if kind == "memory":
        return lambda **options: InMemoryEventStore(**options)
    pool, schema = request.getfixturevalue("pool"), request.getfixturevalue("schema")
    return lambda **options: EventStore(pool, schema=schema, **options)


@pytest.fixture
def event_store(new_store: StoreFactory) -> Store:
    return new_store()


@pytest.fixture
def counters(new_store: StoreFactory) -> Store:
    """A store whose registry holds the counter events (tests/contract/counters.py)."""
    return new_store(registry=REG)


@pytest.fixture
def offline(kind: str) -> StoreFactory:
    """Stores that must refuse bad input before any I/O: a PostgreSQL one has no usable pool at all."""
    if kind == "memory":
        return lambda **options: InMemoryEventStore(**options)
    return lambda **options: EventStore(NoPool(), **options)  # type: ignore[arg-type]


@pytest.fixture
def written(kind: str, event_store: Store, request: pytest.FixtureRequest) -> Written:
    """How many events ``event_store`` holds, counted in its tables or its memory."""
    if kind == "memory":
        async def in_memory() -> int:
            return len(await event_store.read_all(limit=1_000_000))

        return in_memory
    pool = request.getfixturevalue("pool")

    async def in_postgres() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM events"))

    return in_postgres

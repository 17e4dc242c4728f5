"""store.queries.bind: the schema written into the store's statements, once per schema."""

from __future__ import annotations

from typing import Any

from projections import wait
from store import queries
from store.event_store import EventStore

NO_POOL: Any = object()  # EventStore's constructor only keeps its pool


def test_bind_writes_the_quoted_schema_before_every_table() -> None:
    bound = queries.bind(queries.TEMPLATES, "shop")
    assert bound["load_snapshot"] == 'SELECT version, snapshot_type, data FROM "shop".snapshots WHERE stream_id = $1;'
    assert queries.bind(wait.SQL, "shop")["checkpoint_version"] == (
        'SELECT version, halted_version FROM "shop".checkpoints WHERE projection = $1 AND stream_id = $2;')
    assert sorted(bound) == sorted(queries.TEMPLATES)
    assert [name for name, sql in bound.items() if queries.SCHEMA in sql] == []


def test_stores_of_one_schema_share_one_set_of_statement_strings() -> None:
    first, second = EventStore(NO_POOL, schema="shop"), EventStore(NO_POOL, schema="shop")
    assert first.queries is second.queries
    assert first.notifier._notify is first.queries["notify_outbox"]
    other = EventStore(NO_POOL, schema="shop_2")
    assert other.queries["stream_closed"] == (
        'SELECT EXISTS (SELECT 1 FROM "shop_2".closed_streams WHERE stream_id = $1);')

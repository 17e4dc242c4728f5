"""Personal fields where workers decode them: deliveries opened with keys the worker never loaded, and a
rebuild after ``forget`` writing the erased value."""

from __future__ import annotations

import argparse
import asyncio
import os

import pytest

from projections.base import Projection, handles
from store import ERASED, NO_STREAM, EventStore, KeyEncryptionKeys, db
from store.event_store import RecordedEvent
from store.subject_keys import StoredKey
from tests.contract.personal import KEKS, REG, CustomerRegistered, registered
from tests.integration.test_rebuild_helpers import drop_shadows
from workers import broker, rebuild
from workers.cli.forget import cmd_forget, cmd_rewrap_keys
from workers.config import Settings
from workers.projector import checkpoints

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)


class Contacts(Projection):
    """Each customer's e-mail address: personal data in a read model."""

    name = "contacts"
    tables = ("contacts",)
    ddl = "CREATE TABLE IF NOT EXISTS contacts (customer_id text PRIMARY KEY, email text NOT NULL)"

    @handles(CustomerRegistered)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO contacts VALUES ($1, $2) ON CONFLICT (customer_id) DO UPDATE SET email = $2",
                           event.event.customer_id, event.event.email)


async def delivered(pool: db.Pool, store: EventStore, stream_id: str) -> list[RecordedEvent]:
    """The stream's events as a worker gets them: the relay's message bodies, decoded with store.registry."""
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                            "recorded_at, transaction_id FROM events WHERE stream_id = $1 ORDER BY version", stream_id)
    return [broker.from_body(broker.encode_row(row).body, store.registry) for row in rows]


async def test_a_worker_opens_a_delivery_with_a_key_it_never_loaded(pool, schema):
    await EventStore(pool, schema=schema, registry=REG, keks=KEKS).append("customer-1", [registered()], NO_STREAM)
    worker_store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    assert [e.event for e in await delivered(pool, worker_store, "customer-1")] == [registered()]


async def test_a_worker_applies_personal_fields_and_a_rebuild_after_forget_writes_the_erased_value(pool, schema):
    writer = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    await writer.append("customer-1", [registered("c1")], NO_STREAM)
    await writer.append("customer-2", [registered("c2", "bob@example.com")], NO_STREAM)
    await pool.execute(Contacts.ddl)
    worker_store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    for stream_id in ("customer-1", "customer-2"):
        await checkpoints.apply_batch(worker_store, Contacts(), await delivered(pool, worker_store, stream_id))
    assert dict(await pool.fetch("SELECT customer_id, email FROM contacts")) == {
        "c1": "ann@example.com", "c2": "bob@example.com"}
    await writer.forget("c1")
    rebuilder = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    await rebuild.rebuild(pool, rebuilder, Contacts)
    assert dict(await pool.fetch("SELECT customer_id, email FROM contacts")) == {"c1": "", "c2": "bob@example.com"}
    assert [e.event.email for e in await delivered(pool, rebuilder, "customer-1")] == [ERASED]


async def test_the_forget_command_forgets_once_and_says_so(pool, schema, database_url, capsys):
    await EventStore(pool, schema=schema, registry=REG, keks=KEKS).append("customer-1", [registered()], NO_STREAM)
    settings = Settings(database_url=database_url, schema=schema, keks=KEKS)
    assert await cmd_forget(settings, argparse.Namespace(subject="c1")) == 0
    assert await cmd_forget(settings, argparse.Namespace(subject="c1")) == 0
    assert capsys.readouterr().out == "subject c1: forgotten\nsubject c1: already forgotten\n"
    reader = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    assert [e.event.email for e in await reader.load("customer-1")] == [ERASED]


async def test_the_rewrap_keys_command_moves_keys_to_the_newest_kek(pool, schema, database_url, capsys):
    old, new = os.urandom(32), os.urandom(32)
    await EventStore(pool, schema=schema, registry=REG, keks=KeyEncryptionKeys({"old": old})).append(
        "customer-1", [registered()], NO_STREAM)
    settings = Settings(database_url=database_url, schema=schema, keks=KeyEncryptionKeys({"old": old, "new": new}))
    assert await cmd_rewrap_keys(settings, argparse.Namespace()) == 0
    assert capsys.readouterr().out == "rewrapped 1 subject key(s) with key-encryption key new\n"
    assert await pool.fetchval("SELECT kek_id FROM subject_keys WHERE subject = 'c1'") == "new"


async def test_a_batch_of_deliveries_loads_its_new_subjects_keys_in_one_round_trip(pool, schema):
    writer = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    for n in range(3):
        await writer.append(f"customer-{n}", [registered(f"c{n}")], NO_STREAM)
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                            "recorded_at, transaction_id FROM events ORDER BY global_position")
    body = broker.batch_message(0, rows, [broker.event_map(r) for r in rows]).body
    worker_store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    fetch, fetched = worker_store.keys.blocking_fetch, []
    assert fetch is not None

    def counted(subjects: list[str]) -> dict[str, StoredKey]:
        fetched.append(sorted(subjects))
        return fetch(subjects)

    worker_store.keys.blocking_fetch = counted
    batch = broker.from_batch_body(body, worker_store.registry)
    assert [e.event for e in batch.events] == [registered(f"c{n}") for n in range(3)]
    assert fetched == [["c0", "c1", "c2"]]


async def test_inside_a_transaction_keys_are_read_and_made_on_its_connection_and_commit_with_it(pool, schema,
                                                                                                 database_url):
    async with db.create_pool(database_url, schema, min_size=1, max_size=1) as one:
        store = EventStore(one, schema=schema, registry=REG, keks=KEKS)
        await store.partitions()  # read once, on a connection of the store's own
        async with one.acquire() as conn:
            # The pool's only connection is taken: anything that waited for another would hang here.
            tx = conn.transaction()
            await tx.start()
            await asyncio.wait_for(store.append("customer-1", [registered()], NO_STREAM, conn=conn), 10)
            loaded = await asyncio.wait_for(store.load("customer-1", conn=conn), 10)
            await tx.rollback()
    assert [e.event for e in loaded] == [registered()]
    assert await pool.fetchval("SELECT count(*) FROM subject_keys") == 0  # rolled back with the event
    await EventStore(pool, schema=schema, registry=REG, keks=KEKS).append("customer-1", [registered()], NO_STREAM)
    assert [e.event for e in await EventStore(pool, schema=schema, registry=REG, keks=KEKS).load("customer-1")] == [
        registered()]

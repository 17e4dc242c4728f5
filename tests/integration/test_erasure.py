"""Forgetting reaches the read models (issue 22, item 2), verify proves it, and personal values leak nowhere
else (item 3): dead letters, logs, the decode cache, the DLQ copies."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import aio_pika
import pytest
import tenacity

from projections.base import Projection, handles
from projections.reactor import Reactor
from store import ERASED, NO_STREAM, EventStore, db
from store.event_store import RecordedEvent
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.contract.personal import KEKS, REG, CustomerCard, CustomerRegistered, registered
from tests.integration.test_personal_workers import delivered
from tests.integration.test_rebuild_helpers import drop_shadows
from workers import broker, rebuild, relay
from workers.admin.verify import verify
from workers.cli.verify import render
from workers.config import Settings
from workers.projector import checkpoints, parking
from workers.projector.consumer import Consumer
from workers.projector.deliveries import DecodeCache

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)

ANN, BOB = "ann@example.com", "bob@example.com"


class Contacts(Projection):
    """Each customer's e-mail, phone and plan: personal columns declared, erased by the default handler."""

    name = "contacts"
    tables = ("contacts",)
    ddl = ("CREATE TABLE IF NOT EXISTS contacts (customer_id text PRIMARY KEY, email text NOT NULL, phone text, "
           "plan text NOT NULL)")
    personal: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {"contacts": ("customer_id", ("email", "phone"))}

    @handles(CustomerRegistered)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        e = event.event
        await conn.execute("INSERT INTO contacts VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO UPDATE "
                           "SET email = $2, phone = $3, plan = $4", e.customer_id, e.email, e.phone, e.plan)


class SetBasedContacts(Contacts):
    """The same read model with a set-based fast path that only knows CustomerRegistered."""

    name = "set_based_contacts"

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        rows = [(e.event.customer_id, e.event.email, e.event.phone, e.event.plan) for e in events]
        await conn.executemany("INSERT INTO contacts VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO UPDATE "
                               "SET email = $2, phone = $3, plan = $4", rows)


class Quoting(Projection):
    """A handler whose error message quotes the event's personal values."""

    name = "quoting"
    tables = ()
    ddl = "SELECT 1"

    @handles(CustomerRegistered)
    async def fail(self, conn: db.Conn, event: RecordedEvent) -> None:
        raise ValueError(f"cannot mail {event.event.email!r} or call {event.event.phone}")


async def customers(pool: db.Pool, schema: str) -> EventStore:
    """A store with customers c1 (ann) and c2 (bob), one event each."""
    store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    await store.append("customer-1", [registered("c1", ANN, "+33 1 23")], NO_STREAM)
    await store.append("customer-2", [registered("c2", BOB, "+44 9 87")], NO_STREAM)
    return store


async def project(store: EventStore, projection: Projection, *stream_ids: str) -> None:
    """Apply the streams' events as a worker receives them (the relay's bodies), through the checkpoints."""
    for stream_id in stream_ids:
        await checkpoints.apply_batch(store, projection, await delivered(store.pool, store, stream_id))


async def contacts(pool: db.Pool) -> dict[str, tuple[str, str | None, str]]:
    return {r["customer_id"]: (r["email"], r["phone"], r["plan"])
            for r in await pool.fetch("SELECT * FROM contacts")}


async def test_a_forgotten_subjects_declared_columns_are_erased_and_its_row_and_the_others_stay(pool, schema):
    store = await customers(pool, schema)
    await pool.execute(Contacts.ddl)
    await project(store, Contacts(), "customer-1", "customer-2")
    await store.forget("c1")
    await project(store, Contacts(), "subject-c1")
    assert await contacts(pool) == {"c1": ("", None, "gold"), "c2": (BOB, "+44 9 87", "gold")}


async def test_a_set_based_projection_gets_subject_forgotten_through_its_handler(pool, schema):
    store = await customers(pool, schema)
    await pool.execute(Contacts.ddl)
    await project(store, SetBasedContacts(), "customer-1", "customer-2")
    await store.forget("c1")
    events = await delivered(pool, store, "subject-c1") + await delivered(pool, store, "customer-2")
    await checkpoints.apply_batch(store, SetBasedContacts(), events)
    assert await contacts(pool) == {"c1": ("", None, "gold"), "c2": (BOB, "+44 9 87", "gold")}


async def test_a_rebuild_after_a_forget_batches_the_erasure_like_any_handler(pool, schema, caplog):
    store = await customers(pool, schema)
    await store.forget("c1")
    await store.append("customer-1", [registered("c1", "ann@new.example", None)], 0)
    caplog.set_level(logging.INFO)
    await rebuild.rebuild(pool, EventStore(pool, schema=schema, registry=REG, keks=KEKS), Contacts)
    assert [r.getMessage() for r in caplog.records if "real connection" in r.getMessage()] == []
    assert await contacts(pool) == {"c1": ("", None, "gold"), "c2": (BOB, "+44 9 87", "gold")}


def test_personal_columns_of_a_table_the_projection_does_not_own_are_refused():
    with pytest.raises(TypeError, match="not one of its tables"):
        type("Elsewhere", (Contacts,), {"name": "elsewhere", "personal": {"other": ("customer_id", ("email",))}})


def test_a_reactor_declaring_personal_columns_is_refused():
    with pytest.raises(TypeError, match="a reactor cannot declare personal columns"):
        type("Mailer", (Reactor,), {"name": "mailer", "tables": ("sent",),
                                    "personal": {"sent": ("customer_id", ("email",))}})


async def test_verify_names_the_forgotten_subjects_whose_personal_columns_still_hold_values(pool, schema):
    store = await customers(pool, schema)
    await pool.execute(Contacts.ddl)
    await project(store, Contacts(), "customer-1", "customer-2")
    await store.forget("c1")
    before = await verify(pool, EventStore(pool, schema=schema, registry=REG, keks=KEKS), Contacts)
    assert (before.ok, [r.to_json() for r in before.forgotten]) == (False, [
        {"table": "contacts", "subject_column": "customer_id", "columns": ["email", "phone"], "rows": 1,
         "subjects": ["c1"]}])
    assert render(before).splitlines()[-2:] == [
        "  contacts: 1 row of forgotten subjects hold personal values (email, phone): subjects c1",
        "result: MISMATCH"]
    await project(store, Contacts(), "subject-c1")
    after = await verify(pool, EventStore(pool, schema=schema, registry=REG, keks=KEKS), Contacts)
    assert (after.ok, [r.rows for r in after.forgotten]) == (True, [0])
    assert render(after).splitlines()[-2:] == ["  contacts: personal columns of forgotten subjects erased", "result: OK"]


async def test_the_decode_cache_does_not_keep_a_batch_with_personal_fields_past_a_forget(pool, schema):
    store = await customers(pool, schema)
    rows = await pool.fetch("SELECT * FROM events WHERE stream_id = 'customer-1'")
    body = broker.batch_message(0, rows, [broker.event_map(r) for r in rows]).body
    cache = DecodeCache()
    assert [e.event.email for e in cache.decode(body, store.registry).events] == [ANN]
    await store.forget("c1")  # this store's process forgets: its key is gone at once
    assert [e.event.email for e in cache.decode(body, store.registry).events] == [ERASED]


async def test_a_worker_that_decodes_a_subject_forgotten_stops_using_the_subjects_cached_key(pool, schema,
                                                                                             database_url):
    writer = await customers(pool, schema)
    worker_store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    assert [e.event.email for e in await delivered(pool, worker_store, "customer-1")] == [ANN]  # key cached
    await writer.forget("c1")
    rows = await pool.fetch("SELECT * FROM events WHERE stream_id = 'subject-c1'")
    consumer = Consumer(worker_store, None, Contacts(), 0,  # type: ignore[arg-type] # decode needs no channel
                        Settings(database_url=database_url, schema=schema), cache=DecodeCache())
    consumer.decode(1, broker.batch_message(0, rows, [broker.event_map(r) for r in rows]).body)
    assert [e.event.email for e in await delivered(pool, worker_store, "customer-1")] == [ERASED]


async def test_a_parked_handler_error_quoting_personal_values_keeps_them_out_of_dead_letters_and_logs(
        pool, schema, caplog):
    store = await customers(pool, schema)
    caplog.set_level(logging.DEBUG)
    result = await parking.apply_or_park(store, Quoting(), await delivered(pool, store, "customer-1"),
                                         wait=tenacity.wait_none())
    assert len(result.parked) == 1
    row = await pool.fetchrow("SELECT error, traceback FROM dead_letters")
    assert row["error"] == "ValueError: cannot mail '[personal]' or call [personal]"
    assert "cannot mail '[personal]' or call [personal]" in row["traceback"]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "parking poison event" in logged
    assert (ANN in logged, "+33 1 23" in logged) == (False, False)


async def test_a_forgotten_subjects_values_appear_nowhere_in_the_database_the_dlq_or_the_logs(pool, schema,
                                                                                              caplog):
    caplog.set_level(logging.DEBUG)
    store = await customers(pool, schema)
    assert await store.save_snapshot("customer-1", 0, CustomerCard("c1", ANN, 1))
    await pool.execute(Contacts.ddl)
    await project(store, Contacts(), "customer-1", "customer-2")
    parked = await parking.apply_or_park(store, Quoting(), await delivered(pool, store, "customer-1"),
                                         wait=tenacity.wait_none())
    await store.forget("c1")
    await project(store, Contacts(), "subject-c1")
    clear, sealed = (ANN, "+33 1 23"), [v.encode().hex() for v in (ANN, "+33 1 23")]
    dump = await database_text(pool, schema)
    dlq_copies = [broker.to_message(p.event).body for p in parked.parked]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert [v for v in (*clear, *sealed) if v in dump or v in logged] == []
    assert [v for v in clear if any(v.encode() in body for body in dlq_copies)] == []
    # Everything else is exact: bob's row and events, and the forgotten subject's non-personal data.
    assert await contacts(pool) == {"c1": ("", None, "gold"), "c2": (BOB, "+44 9 87", "gold")}
    assert [e.event for e in await store.load("customer-2")] == [registered("c2", BOB, "+44 9 87")]
    assert [(e.event.customer_id, e.event.email, e.event.phone, e.event.plan)
            for e in await store.load("customer-1")] == [("c1", ERASED, None, "gold")]
    assert BOB in dump


async def database_text(pool: db.Pool, schema: str) -> str:
    """Every row of every table of the schema, as text (bytea as hex)."""
    tables = [r["tablename"] for r in await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1",
                                                        schema)]
    return "\n".join([await pool.fetchval(f'SELECT coalesce(string_agg(t::text, chr(10)), \'\') FROM "{t}" AS t')
                      for t in tables])


async def test_a_run_through_the_broker_leaves_a_forgotten_subjects_values_nowhere(pool, schema, prefix, caplog,
                                                                                  spans):
    caplog.set_level(logging.DEBUG)
    store = await customers(pool, schema)
    await pool.execute(Contacts.ddl)
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    targets = await broker.declare_topology(channel, names, ["contacts", "quoting"], PARTITIONS)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        keks=KEKS)
    try:
        async def run() -> None:
            await relay.relay_until_idle(pool, targets)
            for projection in (Contacts(), Quoting()):
                cache = DecodeCache()
                for p in range(PARTITIONS):
                    await Consumer(store, await connection.channel(), projection, p, settings, cache=cache
                                   ).until_idle()

        await run()
        assert await pool.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'parked'") == 2
        await store.forget("c1")
        await run()
        dlq = await channel.get_queue(names.dead_letter_queue("quoting"), ensure=False)
        copies = []
        while (m := await dlq.get(no_ack=True, fail=False)) is not None:
            copies.append(m.body)
        dump = await database_text(pool, schema)
    finally:
        await broker.delete_topology(await connection.channel(), names, ["contacts", "quoting"], PARTITIONS)
        await connection.close()
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert len(copies) == 2
    assert [v for v in (ANN, "+33 1 23") if v in dump or v in logged or any(v.encode() in c for c in copies)] == []
    assert await contacts(pool) == {"c1": ("", None, "gold"), "c2": (BOB, "+44 9 87", "gold")}
    assert BOB.encode() not in b"".join(copies)  # sealed, not erased: the DLQ copies hold no value in the clear
    traced = [(s.name, dict(s.attributes or {}), [dict(link.attributes or {}) for link in s.links])
              for s in spans.get_finished_spans()]
    assert {name.rpartition(" ")[2] for name, _, _ in traced} >= {"publish", "process"}
    assert [t for t in traced if any(v in repr(t) for v in (ANN, BOB, "+33 1 23", "+44 9 87"))] == []

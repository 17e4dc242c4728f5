"""Personal fields on every store: sealed at append, opened on read, erased once their subject is forgotten."""

from __future__ import annotations

import asyncio
import os
import uuid

import msgpack
import pytest

from store import (
    ERASED,
    ERASED_BYTES,
    NO_STREAM,
    EventStore,
    InvalidEvent,
    KeyEncryptionKeyMismatch,
    KeyEncryptionKeyMissing,
    KeyEncryptionKeys,
    NewEvent,
    Position,
    SubjectForgotten,
)
from tests.contract.personal import (
    KEKS,
    REG,
    UPCASTER_SAW,
    CustomerCard,
    CustomerRegistered,
    MoneySent,
    Renamed,
    RenamedV1,
    registered,
)
from tests.integration.test_read_all import read_until


@pytest.fixture
def personal_store(new_store):
    """A store of the personal events with the deployment's key-encryption key."""
    return new_store(registry=REG, keks=KEKS)


@pytest.fixture
def postgres_only(kind: str) -> None:
    """Keys that outlive their store (another store, another KEK, on the same tables) are PostgreSQL's."""
    if kind == "memory":
        pytest.skip("an in-memory store's keys live and die with it")


async def test_personal_fields_read_back_as_appended(personal_store):
    await personal_store.append("customer-1", [registered(), registered(phone=None)], NO_STREAM)
    loaded = await personal_store.load("customer-1")
    assert [e.event for e in loaded] == [registered(), registered(phone=None)]
    everything = await read_until(personal_store, Position.START, lambda read: len(read) >= 2)
    assert [e.event for e in everything] == [registered(), registered(phone=None)]


async def test_personal_values_are_stored_sealed_and_everything_else_in_the_clear(personal_store):
    await personal_store.append("customer-1", [registered()], NO_STREAM)
    (event,) = await personal_store.load("customer-1")
    assert b"ann@example.com" not in event.data
    assert b"+33 1 23" not in event.data
    stored = msgpack.unpackb(event.data)
    # The subject's personal values are sealed together, as one group under the key "": head, nonce, ciphertext.
    assert sorted(stored) == ["", "customer_id", "plan"]
    assert (stored["customer_id"], stored["plan"], [type(part) for part in stored[""]]) == ("c1", "gold", [bytes] * 3)


async def test_forgetting_a_subject_erases_its_personal_fields_and_keeps_the_rest(personal_store):
    await personal_store.append("customer-1", [registered("c1")], NO_STREAM)
    await personal_store.append("customer-2", [registered("c2", "bob@example.com")], NO_STREAM)
    assert await personal_store.forget("c1") is True
    (erased,) = await personal_store.load("customer-1")
    (kept,) = await personal_store.load("customer-2")
    assert erased.event == registered("c1", ERASED, None)
    assert (str(erased.event.email), erased.event.phone, erased.event.plan) == ("", None, "gold")
    assert erased.event.email != ""  # the erased value equals no real value
    assert kept.event == registered("c2", "bob@example.com")


async def test_an_append_batch_of_several_subjects_reads_back_and_a_forget_erases_only_its_own(personal_store):
    await personal_store.append_batch([("customer-1", [registered("c1")], NO_STREAM),
                                       ("customer-2", [registered("c2", "bob@example.com")], NO_STREAM)])
    await personal_store.forget("c2")
    loaded = {s: [e.event for e in await personal_store.load(s)] for s in ("customer-1", "customer-2")}
    assert loaded == {"customer-1": [registered("c1")], "customer-2": [registered("c2", ERASED, None)]}


async def test_personal_fields_of_two_subjects_in_one_event_are_forgotten_each_on_its_own(personal_store):
    sent = MoneySent("c1", "FR76 3000 6000", "c2", b"DE89 3704 0044", "Bob", 100)
    await personal_store.append("transfer-1", [sent], NO_STREAM)
    assert [e.event for e in await personal_store.load("transfer-1")] == [sent]
    await personal_store.forget("c2")
    (event,) = await personal_store.load("transfer-1")
    assert event.event == MoneySent("c1", "FR76 3000 6000", "c2", ERASED_BYTES, None, 100)
    await personal_store.forget("c1")
    (event,) = await personal_store.load("transfer-1")
    assert event.event == MoneySent("c1", ERASED, "c2", ERASED_BYTES, None, 100)


async def test_forgetting_appends_subject_forgotten_to_the_subjects_stream_once(personal_store):
    assert await personal_store.forget("c1") is True
    assert await personal_store.forget("c1") is False
    assert [e.event for e in await personal_store.load("subject-c1")] == [SubjectForgotten("c1")]


async def test_personal_fields_of_a_forgotten_subject_are_not_stored_when_appended(personal_store):
    await personal_store.forget("c1")
    await personal_store.append("customer-1", [registered("c1")], NO_STREAM)
    (event,) = await personal_store.load("customer-1")
    assert event.event == registered("c1", ERASED, None)
    assert b"ann@example.com" not in event.data


async def test_an_upcaster_sees_the_erased_value_of_a_forgotten_subject(personal_store):
    await personal_store.append("customer-1", [RenamedV1("c1", "Ann")], NO_STREAM)
    await personal_store.forget("c1")
    UPCASTER_SAW.clear()
    (event,) = await personal_store.load("customer-1")
    assert UPCASTER_SAW == [{"customer_id": "c1", "name": ERASED}]
    assert event.event == Renamed("c1", ERASED, "")


async def test_a_snapshot_with_personal_fields_reads_back_and_is_erased_by_forget(personal_store):
    await personal_store.save_snapshot("customer-1", 3, CustomerCard("c1", "ann@example.com", 2))
    assert (await personal_store.load_snapshot("customer-1")).state == CustomerCard("c1", "ann@example.com", 2)
    await personal_store.forget("c1")
    assert (await personal_store.load_snapshot("customer-1")).state == CustomerCard("c1", ERASED, 2)


async def test_a_retried_append_of_personal_fields_returns_the_original_result(personal_store):
    event = NewEvent(registered(), uuid.uuid4())
    first = await personal_store.append("customer-1", [event], NO_STREAM)
    assert await personal_store.append("customer-1", [event], NO_STREAM) == first
    assert len(await personal_store.load("customer-1")) == 1


async def test_appending_personal_fields_without_a_kek_is_refused_naming_the_variable(new_store):
    store = new_store(registry=REG, keks=None)
    with pytest.raises(KeyEncryptionKeyMissing, match="EVENTFLEET_KEK"):
        await store.append("customer-1", [registered()], NO_STREAM)
    assert await store.stream_version("customer-1") == NO_STREAM


async def test_reading_with_another_kek_is_a_typed_error(postgres_only, pool, schema):
    await EventStore(pool, schema=schema, registry=REG, keks=KEKS).append("customer-1", [registered()], NO_STREAM)
    wrong = EventStore(pool, schema=schema, registry=REG, keks=KeyEncryptionKeys({"kek-1": os.urandom(32)}))
    with pytest.raises(KeyEncryptionKeyMismatch, match="EVENTFLEET_KEK"):
        await wrong.load("customer-1")
    missing = EventStore(pool, schema=schema, registry=REG, keks=None)
    with pytest.raises(KeyEncryptionKeyMissing):
        await missing.load("customer-1")


async def test_a_store_without_a_kek_reads_every_event_without_personal_fields(postgres_only, pool, schema):
    await EventStore(pool, schema=schema, registry=REG, keks=KEKS).append("customer-1", [registered()], NO_STREAM)
    await EventStore(pool, schema=schema, registry=REG, keks=KEKS).forget("c9")
    plain = EventStore(pool, schema=schema, registry=REG, keks=None)
    assert [e.event for e in await plain.load("subject-c9")] == [SubjectForgotten("c9")]


async def test_rewrapping_moves_every_key_to_the_newest_kek(postgres_only, pool, schema):
    old, new = os.urandom(32), os.urandom(32)
    await EventStore(pool, schema=schema, registry=REG, keks=KeyEncryptionKeys({"old": old})).append(
        "customer-1", [registered()], NO_STREAM)
    rotating = EventStore(pool, schema=schema, registry=REG, keks=KeyEncryptionKeys({"old": old, "new": new}))
    assert await rotating.rewrap_keys() == 1
    assert await rotating.rewrap_keys() == 0
    after = EventStore(pool, schema=schema, registry=REG, keks=KeyEncryptionKeys({"new": new}))
    assert [e.event for e in await after.load("customer-1")] == [registered()]


async def test_another_process_sees_the_erasure_once_its_cached_key_expires(postgres_only, pool, schema):
    writer = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    reader = EventStore(pool, schema=schema, registry=REG, keks=KEKS, key_cache_seconds=0)
    await writer.append("customer-1", [registered()], NO_STREAM)
    assert [e.event for e in await reader.load("customer-1")] == [registered()]
    await writer.forget("c1")
    assert [e.event for e in await reader.load("customer-1")] == [registered("c1", ERASED, None)]


async def test_an_event_with_personal_fields_is_refused_before_any_io(offline):
    store = offline(registry=REG, keks=KEKS)
    bad = CustomerRegistered("c1", "ann@example.com", None, 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match=r"CustomerRegistered\.plan: expected str, got int"):
        await store.append("customer-1", [registered(), bad], NO_STREAM)
    with pytest.raises(InvalidEvent, match=r"CustomerRegistered\.plan"):
        await store.append_batch([("customer-1", [registered()], NO_STREAM), ("customer-2", [bad], NO_STREAM)])


async def test_writers_racing_for_a_new_subjects_key_agree_on_one(postgres_only, pool, schema):
    writers = [EventStore(pool, schema=schema, registry=REG, keks=KEKS) for _ in range(4)]
    await asyncio.gather(*(w.append(f"customer-{n}", [registered()], NO_STREAM) for n, w in enumerate(writers)))
    reader = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
    assert [e.event for n in range(4) for e in await reader.load(f"customer-{n}")] == [registered()] * 4
    assert await pool.fetchval("SELECT count(*) FROM subject_keys") == 1


async def test_metadata_holding_one_of_the_events_personal_values_is_refused(personal_store):
    with pytest.raises(InvalidEvent, match="metadata holds the value of personal field 'email'"):
        await personal_store.append("customer-1", [NewEvent(registered(), metadata={
            "source": {"contact": ["ann@example.com"]}})], NO_STREAM)
    assert await personal_store.stream_version("customer-1") == NO_STREAM
    await personal_store.append("customer-1", [NewEvent(registered(), metadata={"source": "signup"})], NO_STREAM)

"""Personal fields without a database: the erased values, what a class may declare, the KEKs, the seals."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import uuid
from typing import Annotated

import msgpack
import pytest

from store import ERASED, ERASED_BYTES, Erased, InMemoryEventStore, Personal, codec, errors
from store.subject_keys import KeyEncryptionKeys, MemoryKeyTable, SubjectKeys
from tests.contract.personal import KEKS, REG, CustomerRegistered, registered
from workers.config import Settings

KEY = base64.b64encode(b"k" * 32).decode()


def keyed() -> tuple[codec.Registry, SubjectKeys]:
    """REG sealing with keys kept in memory (created by ``ensure``)."""
    table = MemoryKeyTable()
    keys = SubjectKeys(table, KEKS, blocking_fetch=lambda subjects: {s: table.rows[s] for s in subjects
                                                                      if s in table.rows})
    return REG.with_cipher(codec.Cipher(keys)), keys


# --- the erased values ---------------------------------------------------------------------------------


def test_erased_is_an_empty_str_unequal_to_every_real_str() -> None:
    assert isinstance(ERASED, str)
    assert (str(ERASED), len(ERASED), bool(ERASED)) == ("", 0, False)
    assert ERASED != ""
    assert ERASED != "ann@example.com"
    assert "" != ERASED  # noqa: SIM300 - the reflected comparison, str on the left


def test_erased_equals_erased_and_hashes_alike() -> None:
    assert Erased() == ERASED
    assert {ERASED: 1}[Erased()] == 1


def test_erased_bytes_is_empty_bytes_unequal_to_real_bytes() -> None:
    assert isinstance(ERASED_BYTES, bytes)
    assert bytes(ERASED_BYTES) == b""
    assert ERASED_BYTES != b""


# --- what a class may declare --------------------------------------------------------------------------


def test_a_personal_field_without_an_erased_value_is_refused_at_registration() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Born:
        customer_id: str
        year: Annotated[int, Personal(subject="customer_id")]

    with pytest.raises(TypeError, match=r"Born\.year: a personal field must be str, bytes or optional"):
        codec.Registry().event("Born")(Born)


def test_a_subject_that_names_no_other_field_is_refused_at_registration() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Mailed:
        email: Annotated[str, Personal(subject="customer")]

    with pytest.raises(TypeError, match=r"Mailed\.email: Personal\(subject='customer'\) must name another field"):
        codec.Registry().event("Mailed")(Mailed)


def test_an_optional_personal_field_is_accepted() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Phoned:
        customer_id: str
        phone: Annotated[str | None, Personal(subject="customer_id")]

    registry = codec.Registry()
    registry.event("Phoned")(Phoned)
    assert [(f.name, f.subject, f.kind) for f in registry.personal(Phoned)] == [("phone", "customer_id", "n")]


# --- the key-encryption keys ---------------------------------------------------------------------------


def test_a_bare_kek_gets_an_id_from_its_fingerprint() -> None:
    keks = KeyEncryptionKeys.parse(KEY, "EVENTFLEET_KEK")
    assert keks.newest == "k" + hashlib.sha256(b"k" * 32).hexdigest()[:12]


def test_the_last_of_several_keks_is_the_newest() -> None:
    other = base64.b64encode(b"o" * 32).decode()
    keks = KeyEncryptionKeys.parse(f"old:{KEY}, new:{other}", "EVENTFLEET_KEK")
    assert keks.newest == "new"
    kek_id, wrapped = keks.wrap("c1", b"d" * 32)
    assert (kek_id, keks.unwrap("c1", kek_id, wrapped)) == ("new", b"d" * 32)


@pytest.mark.parametrize("text", ["not base64!", base64.b64encode(b"short").decode(), f":{KEY}", " , "])
def test_a_malformed_kek_is_a_config_error_naming_the_variable(text: str) -> None:
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_KEK"):
        KeyEncryptionKeys.parse(text, "EVENTFLEET_KEK")


def test_a_kek_file_is_read_one_entry_a_line(tmp_path) -> None:
    path = tmp_path / "kek"
    path.write_text(f"# rotated 2026-12\nold:{KEY}\nnew:{base64.b64encode(b'n' * 32).decode()}\n")
    keks = KeyEncryptionKeys.from_env({"EVENTFLEET_KEK_FILE": str(path)})
    assert keks is not None
    assert keks.newest == "new"


def test_setting_both_kek_variables_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_KEK or EVENTFLEET_KEK_FILE, not both"):
        KeyEncryptionKeys.from_env({"EVENTFLEET_KEK": KEY, "EVENTFLEET_KEK_FILE": "/nowhere"})


def test_no_kek_variable_means_no_keks() -> None:
    assert KeyEncryptionKeys.from_env({}) is None


def test_the_repr_of_keks_shows_ids_and_never_keys() -> None:
    assert repr(KeyEncryptionKeys.parse(f"a:{KEY}", "EVENTFLEET_KEK")) == "KeyEncryptionKeys(ids=['a'])"


def test_a_key_wrapped_by_another_kek_under_the_same_id_is_a_mismatch() -> None:
    kek_id, wrapped = KeyEncryptionKeys({"a": os.urandom(32)}).wrap("c1", b"d" * 32)
    with pytest.raises(errors.KeyEncryptionKeyMismatch, match="EVENTFLEET_KEK"):
        KeyEncryptionKeys({"a": os.urandom(32)}).unwrap("c1", kek_id, wrapped)


# --- the seals ------------------------------------------------------------------------------------------


async def test_a_subjects_personal_values_are_sealed_together_under_the_first_field() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    _, data = registry.encode(registered(), (uuid.uuid4(), "customer-1"))
    stored = msgpack.unpackb(data)
    assert sorted(stored) == ["customer_id", "email", "plan"]
    assert isinstance(stored["email"], msgpack.ExtType)
    assert stored["email"].code == 5


async def test_every_seal_draws_a_new_nonce() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    origin = (uuid.uuid4(), "customer-1")
    first, second = (msgpack.unpackb(registry.encode(registered(), origin)[1])["email"].data for _ in range(2))
    head = 2 + int.from_bytes(first[:2], "big")
    assert first[:head] == second[:head]
    assert first[head:head + 12] != second[head:head + 12]


@pytest.mark.parametrize("elsewhere", ["another event", "another stream"])
async def test_a_sealed_value_moved_to_another_event_or_stream_does_not_open(elsewhere: str) -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    event_id = uuid.uuid4()
    _, data = registry.encode(registered(), (event_id, "customer-1"))
    origin = (uuid.uuid4(), "customer-1") if elsewhere == "another event" else (event_id, "customer-2")
    with pytest.raises(errors.CorruptEvent, match="does not authenticate"):
        registry.decode("CustomerRegistered.v1", data, origin)


async def test_a_sealed_value_moved_to_another_field_does_not_open() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    origin = (uuid.uuid4(), "customer-1")
    stored = msgpack.unpackb(registry.encode(registered(), origin)[1])
    moved = {"customer_id": "c1", "plan": stored["email"], "email": "x"}
    with pytest.raises(errors.CorruptEvent, match="does not authenticate"):
        registry.decode("CustomerRegistered.v1", msgpack.packb(moved), origin)


async def test_reading_sealed_values_without_a_cipher_is_a_missing_kek() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    origin = (uuid.uuid4(), "customer-1")
    _, data = registry.encode(registered(), origin)
    with pytest.raises(errors.KeyEncryptionKeyMissing, match="EVENTFLEET_KEK"):
        REG.decode("CustomerRegistered.v1", data, origin)


async def test_an_erased_value_appended_again_stays_erased() -> None:
    store = InMemoryEventStore(registry=REG, keks=KEKS)
    await store.append("customer-1", [CustomerRegistered("c1", ERASED, None, "gold")], -1)
    (event,) = await store.load("customer-1")
    assert event.event == CustomerRegistered("c1", ERASED, None, "gold")


async def test_the_key_cache_keeps_at_most_its_size() -> None:
    table = MemoryKeyTable()
    keys = SubjectKeys(table, KEKS, cache_size=2)
    await keys.ensure(["a", "b", "c"])
    assert keys.missing(["a", "b", "c"]) == ["a"]


async def test_an_erased_value_beside_a_real_one_stays_erased() -> None:
    store = InMemoryEventStore(registry=REG, keks=KEKS)
    await store.append("customer-1", [CustomerRegistered("c1", ERASED, "+33 1 23", "gold")], -1)
    (event,) = await store.load("customer-1")
    assert event.event == CustomerRegistered("c1", ERASED, "+33 1 23", "gold")


def test_settings_read_the_keks_and_name_a_bad_one() -> None:
    keks = Settings.from_env({"EVENTFLEET_KEK": f"a:{KEY}"}).keks
    assert keks is not None
    assert keks.newest == "a"
    assert Settings.from_env({}).keks is None
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_KEK_FILE"):
        Settings.from_env({"EVENTFLEET_KEK_FILE": "/nonexistent/kek"})

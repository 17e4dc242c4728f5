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
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from store import ERASED, ERASED_BYTES, Erased, InMemoryEventStore, Personal, codec, errors
from store.codec.cipher import sealed_subjects
from store.subject_keys import KeyEncryptionKeys, MemoryKeyTable, SubjectKeys
from tests.contract.personal import KEKS, REG, CustomerCard, CustomerRegistered, registered
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


async def test_a_subjects_personal_values_are_sealed_together_under_the_sealed_key() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    _, data = registry.encode(registered(), (uuid.uuid4(), "customer-1"))
    stored = msgpack.unpackb(data)
    assert sorted(stored) == ["", "customer_id", "plan"]
    head, nonce, sealed = stored[""]
    assert head == b"\x02sn\x00\x02c1\x05email\x05phone"
    assert (len(nonce), len(sealed)) == (12, len(msgpack.packb(["ann@example.com", "+33 1 23"])) + 16)


async def test_every_seal_draws_a_new_nonce() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    origin = (uuid.uuid4(), "customer-1")
    first, second = (msgpack.unpackb(registry.encode(registered(), origin)[1])[""] for _ in range(2))
    assert first[0] == second[0]
    assert first[1] != second[1]


@pytest.mark.parametrize("elsewhere", ["another event", "another stream"])
async def test_a_sealed_value_moved_to_another_event_or_stream_does_not_open(elsewhere: str) -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    event_id = uuid.uuid4()
    _, data = registry.encode(registered(), (event_id, "customer-1"))
    origin = (uuid.uuid4(), "customer-1") if elsewhere == "another event" else (event_id, "customer-2")
    with pytest.raises(errors.CorruptEvent, match="does not authenticate"):
        registry.decode("CustomerRegistered.v1", data, origin)


async def test_a_sealed_group_given_other_field_names_does_not_open() -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    origin = (uuid.uuid4(), "customer-1")
    stored = msgpack.unpackb(registry.encode(registered(), origin)[1])
    head, nonce, sealed = stored[""]
    stored[""] = [head.replace(b"email", b"xxxxx").replace(b"phone", b"email").replace(b"xxxxx", b"phone"),
                  nonce, sealed]
    with pytest.raises(errors.CorruptEvent, match="does not authenticate"):
        registry.decode("CustomerRegistered.v1", msgpack.packb(stored), origin)


@pytest.mark.parametrize("groups", [[], [b"\x02sn\x00\x02c1\x05email\x05phone", b"n" * 12], ["head", b"", b""],
                                    [[1], b"", b""], [b"\x02sn\x00\x02c1\x05email", b"", b""], "sealed"])
async def test_malformed_sealed_groups_are_corrupt(groups: object) -> None:
    registry, keys = keyed()
    await keys.ensure(["c1"])
    data = msgpack.packb({"customer_id": "c1", "plan": "gold", "": groups})
    with pytest.raises(errors.CorruptEvent):
        registry.decode("CustomerRegistered.v1", data, (uuid.uuid4(), "customer-1"))


# --- the first layout (ext type 5 under the first field), written before the sealed key -----------------

#: Written by the code of 4116818 with data key b"d" * 32 for subject c1 and nonce b"n" * 12: an event
#: (id FIRST_LAYOUT_ID, stream customer-1), the same for subject c2 forgotten at append (stream
#: customer-2), and a snapshot of customer-1.
FIRST_LAYOUT_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
FIRST_LAYOUT_EVENT = bytes.fromhex(
    "83ab637573746f6d65725f6964a26331a5656d61696cc74505000d02736e000263310570686f6e656e6e6e6e6e6e6e6e6e6e6e6e66"
    "485670ea3750198e0309c958b9b8650c773b9aab29eb8f6190f6e4ec70357cbea1e4c76ce9100b7458a4706c616ea4676f6c64")
FIRST_LAYOUT_FORGOTTEN = bytes.fromhex(
    "83ab637573746f6d65725f6964a26332a5656d61696cc70f05000d02736e000263320570686f6e65a4706c616ea4676f6c64")
FIRST_LAYOUT_SNAPSHOT = bytes.fromhex(
    "83ab637573746f6d65725f6964a26331a5656d61696cc7350500060173000263316e6e6e6e6e6e6e6e6e6e6e6e65485670ea3750"
    "198e0309c958b9b8650c1783110b43c40c1f6853586a9299087aa66f726465727303")


class FixedKeys:
    """A keyring holding data key b"d" * 32 for subject c1, the others forgotten."""

    def __init__(self, forgotten: bool = False) -> None:
        self.forgotten = forgotten

    def key(self, subject: str) -> AESGCM | None:
        return AESGCM(b"d" * 32) if subject == "c1" and not self.forgotten else None

    def preload(self, subjects: object) -> None:
        pass


def test_an_event_stored_in_the_first_layout_reads_as_ever() -> None:
    registry = REG.with_cipher(codec.Cipher(FixedKeys()))
    event = registry.decode("CustomerRegistered.v1", FIRST_LAYOUT_EVENT, (FIRST_LAYOUT_ID, "customer-1"))
    assert event == registered()


def test_a_snapshot_stored_in_the_first_layout_reads_as_ever() -> None:
    registry = REG.with_cipher(codec.Cipher(FixedKeys()))
    state = registry.decode("CustomerCard.v1", FIRST_LAYOUT_SNAPSHOT, (None, "customer-1"))
    assert state == CustomerCard("c1", "ann@example.com", 3)


def test_an_event_stored_in_the_first_layout_reads_erased_once_its_subject_is_forgotten() -> None:
    registry = REG.with_cipher(codec.Cipher(FixedKeys(forgotten=True)))
    event = registry.decode("CustomerRegistered.v1", FIRST_LAYOUT_EVENT, (FIRST_LAYOUT_ID, "customer-1"))
    assert event == CustomerRegistered("c1", ERASED, None, "gold")


def test_an_event_stored_in_the_first_layout_for_a_forgotten_subject_reads_erased() -> None:
    registry = REG.with_cipher(codec.Cipher(FixedKeys()))
    event = registry.decode("CustomerRegistered.v1", FIRST_LAYOUT_FORGOTTEN, (FIRST_LAYOUT_ID, "customer-2"))
    assert event == CustomerRegistered("c2", ERASED, None, "gold")


def test_a_first_layout_sealed_value_moved_to_another_field_does_not_open() -> None:
    registry = REG.with_cipher(codec.Cipher(FixedKeys()))
    stored = msgpack.unpackb(FIRST_LAYOUT_EVENT)
    moved = {"customer_id": "c1", "plan": stored["email"], "email": "x"}
    with pytest.raises(errors.CorruptEvent, match="does not authenticate"):
        registry.decode("CustomerRegistered.v1", msgpack.packb(moved), (FIRST_LAYOUT_ID, "customer-1"))


async def test_the_subjects_of_both_layouts_are_found_for_preloading() -> None:
    registry, keys = keyed()
    await keys.ensure(["c3"])
    _, data = registry.encode(registered("c3"), (uuid.uuid4(), "customer-3"))
    assert sealed_subjects([FIRST_LAYOUT_EVENT, data, msgpack.packb({"plan": ""})]) == ["c1", "c3"]


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

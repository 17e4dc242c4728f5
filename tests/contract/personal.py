"""Event classes with personal fields, in a registry of their own, for the personal-data tests."""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any

from store import Personal, codec
from store.subject_keys import KeyEncryptionKeys

REG = codec.Registry()

#: A deployment's key-encryption key (random per test run: nothing depends on its bytes).
KEKS = KeyEncryptionKeys({"kek-1": os.urandom(32)})


@REG.event("CustomerRegistered")
@dataclasses.dataclass(frozen=True, slots=True)
class CustomerRegistered:
    customer_id: str
    email: Annotated[str, Personal(subject="customer_id")]
    phone: Annotated[str | None, Personal(subject="customer_id")]
    plan: str


@REG.event("MoneySent")
@dataclasses.dataclass(frozen=True, slots=True)
class MoneySent:
    """Personal fields of two subjects in one event: two sealed groups."""

    sender_id: str
    sender_iban: Annotated[str, Personal(subject="sender_id")]
    receiver_id: str
    receiver_iban: Annotated[bytes, Personal(subject="receiver_id")]
    receiver_name: Annotated[str | None, Personal(subject="receiver_id")]
    amount: int


@REG.event("CustomerCard")
@dataclasses.dataclass(frozen=True, slots=True)
class CustomerCard:
    """A snapshot state holding personal data."""

    customer_id: str
    email: Annotated[str, Personal(subject="customer_id")]
    orders: int


@REG.event("Renamed", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class RenamedV1:
    customer_id: str
    name: Annotated[str, Personal(subject="customer_id")]


@REG.event("Renamed", version=2)
@dataclasses.dataclass(frozen=True, slots=True)
class Renamed:
    customer_id: str
    full_name: Annotated[str, Personal(subject="customer_id")]
    initial: str


#: What the v1-to-v2 upcaster was given, last.
UPCASTER_SAW: list[dict[str, Any]] = []


@REG.upcaster("Renamed", from_version=1)
def _rename(fields: dict[str, Any]) -> dict[str, Any]:
    UPCASTER_SAW.append(dict(fields))
    name = fields.pop("name")
    return {**fields, "full_name": name, "initial": name[:1]}


def registered(customer: str = "c1", email: str = "ann@example.com", phone: str | None = "+33 1 23") -> CustomerRegistered:
    return CustomerRegistered(customer, email, phone, "gold")

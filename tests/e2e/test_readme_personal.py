"""The README's "Personal data and erasure" runs as written: its classes, and what it says is and is not erased,
and what appending needs, checked in a process of their own (the classes register in the global registry)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

from tests.e2e import readme

#: What the README's blocks need imported, then the blocks, then what it says a forget does.
PROGRAM = """\
import asyncio
import dataclasses
from typing import Annotated, ClassVar

import eventfleet as ef
from store import InMemoryEventStore

{blocks}

async def main() -> None:
    store = InMemoryEventStore()
    await store.append("customer-c-42", [CustomerRegistered("c-42", "ann@example.com", "+33 1 23")], -1)
    before = (await store.load("customer-c-42"))[0].event
    await store.forget("c-42")
    (after,) = await store.load("customer-c-42")
    forgotten = (await store.load("subject-c-42"))[0].event
    print(before, after.event, after.event_type, after.stream_id, after.event.email is ef.ERASED, forgotten,
          sep="\\n")

try:
    asyncio.run(main())
except ef.KeyEncryptionKeyMissing as exc:
    print(f"KeyEncryptionKeyMissing: {{exc}}")
"""


def personal_paragraph() -> str:
    text = (readme.ROOT / "README.md").read_text()  # the last section: readme.section wants one after it
    start = text.index("**Personal data and erasure.**")
    return text[start:text.index("\n**", start + 1)]


def run(environ: dict[str, str]) -> str:
    blocks = "\n\n".join(body for _, body in readme.blocks(personal_paragraph(), "python"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTFLEET_KEK")} | environ
    done = subprocess.run([sys.executable, "-c", PROGRAM.format(blocks=blocks)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readmes_personal_fields_read_as_it_says_before_and_after_a_forget() -> None:
    kek = base64.b64encode(os.urandom(32)).decode()  # what `openssl rand -base64 32` prints
    assert run({"EVENTFLEET_KEK": kek}) == textwrap.dedent("""\
        CustomerRegistered(customer_id='c-42', email='ann@example.com', phone='+33 1 23')
        CustomerRegistered(customer_id='c-42', email=ERASED, phone=None)
        CustomerRegistered.v1
        customer-c-42
        True
        SubjectForgotten(subject='c-42')
        """)


def test_without_a_kek_appending_the_readmes_personal_fields_fails_as_it_says() -> None:
    assert run({}).startswith("KeyEncryptionKeyMissing: ")

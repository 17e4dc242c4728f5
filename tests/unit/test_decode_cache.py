"""A worker's decode cache is bounded in bytes, not entries."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from store import codec
from workers import broker, errors
from workers.config import Settings
from workers.projector.deliveries import DecodeCache

KIB = 1024


def body(size: int) -> bytes:
    """A batch body of one event of about ``size`` bytes (its type unknown here: it decodes Undecodable)."""
    row = {"event_id": uuid.uuid4(), "stream_id": "s-1", "version": 1, "global_position": 1, "transaction_id": 1,
           "event_type": "Blob.v1", "data": b"x" * size, "metadata": codec.packb({}),
           "recorded_at": dt.datetime.now(dt.UTC)}
    return broker.batch_message(0, [row], [broker.event_map(row)]).body


def test_the_cache_keeps_bodies_up_to_its_byte_budget_forgetting_the_oldest() -> None:
    cache = DecodeCache(100 * KIB)
    bodies = [body(7 * KIB) for _ in range(6)]
    first = [cache.decode(b, codec.REGISTRY) for b in bodies]

    # Each costs its body and its data twice (just over 21 KiB): 4 fit in 100 KiB, 5 do not.
    assert cache.bytes == sum(len(b) + 2 * 7 * KIB for b in bodies[2:])
    assert cache.decode(bodies[-1], codec.REGISTRY) is first[-1]
    assert cache.decode(bodies[0], codec.REGISTRY) is not first[0]


def test_a_body_over_a_quarter_of_the_budget_is_decoded_not_kept() -> None:
    cache = DecodeCache(100 * KIB)
    big = body(9 * KIB)  # 9 KiB of data: over 27 KiB with its body and decoded copies

    assert cache.decode(big, codec.REGISTRY) is not cache.decode(big, codec.REGISTRY)
    assert cache.bytes == 0


def test_a_kept_batch_counts_what_decoding_it_made_not_only_its_body() -> None:
    cache = DecodeCache(2048 * KIB)
    one = body(100 * KIB)
    cache.decode(one, codec.REGISTRY)

    assert cache.bytes == len(one) + 2 * 100 * KIB


def test_a_worker_refuses_a_body_over_its_largest_message() -> None:
    cache = DecodeCache(100 * KIB, max_message_bytes=10 * KIB)

    with pytest.raises(errors.MalformedMessage, match="over the 10240 limit"):
        cache.decode(body(20 * KIB), codec.REGISTRY)



def test_a_worker_applies_a_message_published_under_larger_limits_than_its_own() -> None:
    # Events of 1 MiB stored before EVENTFLEET_MAX_PAYLOAD_BYTES was lowered to 64 KiB: the broker delivers them.
    settings = Settings(max_payload_bytes=64 * KIB, message_bytes=64 * KIB)
    big = body(1024 * KIB)

    assert len(big) > settings.max_message_bytes
    assert len(DecodeCache.of(settings).decode(big, codec.REGISTRY).events) == 1

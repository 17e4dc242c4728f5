"""Partitions of streams: each stream belongs to one of P partitions, by a stable hash of its id.

The same function as the schema's SQL ``stream_partition(stream_id, partitions)``: the first 32 bits of
the md5 of the id's UTF-8 bytes, as an unsigned integer, modulo P (tests hold the two equal). A stream's
events stay in one partition, so whoever owns a partition sees all of a stream, in order. P is chosen when
a schema is first migrated and recorded in its ``partitioning`` table; it never changes under running
processes (``store.migrate`` refuses another value: see ``PartitionsMismatch``).
"""

from __future__ import annotations

import hashlib

#: P for a schema migrated without EVENTFLEET_PARTITIONS.
DEFAULT_PARTITIONS = 16
#: The most partitions a schema may have (the column's CHECK says the same).
MAX_PARTITIONS = 4096


def partition_of(stream_id: str, partitions: int) -> int:
    """The partition of ``stream_id`` among ``partitions``."""
    digest = hashlib.md5(stream_id.encode("utf-8"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % partitions

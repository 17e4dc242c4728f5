"""Fixtures of the cluster tests (tests/cluster): servers of their own beside the machine's default ones."""

from __future__ import annotations

# --- RabbitMQ cluster (tests/cluster/rabbit.py) ----------------------------------------------------------------
# `rabbit_cluster` (session: three RabbitMQ nodes clustered, started on first use, removed at the end) and
# `rabbit` (the same cluster, healed before and after each test). Defined in rabbit.py; imported here so every
# test under tests/cluster sees them.
from tests.cluster.rabbit import rabbit, rabbit_cluster  # noqa: F401

# --- end of RabbitMQ cluster ------------------------------------------------------------------------------------

# --- PostgreSQL primary and standby (tests/cluster/postgres.py) -------------------------------------------------
# isort: split
# `postgres_pair_factory` (an ExitStack to enter `postgres_pair(synchronous=..., replication_delay=...)` in; skips
# when the machine cannot run PostgreSQL 15 servers of its own), `sync_pair` and `async_pair` (a started pair each,
# removed after the test). Defined in postgres.py; imported here so every test under tests/cluster sees them.
from tests.cluster.postgres import async_pair, postgres_pair_factory, sync_pair  # noqa: F401
# --- end of PostgreSQL primary and standby ----------------------------------------------------------------------

"""Fixtures of the chaos suite: a RabbitMQ vhost of its own, and a deployment (schema, prefix) per test."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.chaos import faults, harness
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS


def _rabbitmqctl(*args: str) -> None:
    # Another test may have stopped the app for a moment: wait for it first.
    subprocess.run(["rabbitmqctl", "--quiet", "await_startup", "--timeout", "120"], check=False, capture_output=True,
                   timeout=180)
    subprocess.run(["rabbitmqctl", "--quiet", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """A vhost for the fleets, so that close_all_connections can be aimed at them alone."""
    name = f"eventfleet_chaos_{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture
async def deployment(schema: str, prefix: str, vhost: str, request: pytest.FixtureRequest
                     ) -> AsyncIterator[harness.Deployment]:
    """This test's schema (migrated) and prefix, in the chaos vhost; torn down after (workers.fleet). A test marked
    ``grouped`` runs its fleet in the worker group ``chaos`` (EVENTFLEET_GROUP: one queue per partition for every
    read model; docs/reference.md 6.0)."""
    group = "chaos" if request.node.get_closest_marker("grouped") is not None else None
    deployment = harness.Deployment(DATABASE_URL, harness.vhost_url(AMQP_URL, vhost), vhost, schema, prefix,
                                    PARTITIONS, group)
    yield deployment
    # Another test may be restarting Postgres: let it come back before the deployment is torn down.
    await faults.wait_postgres(DATABASE_URL)
    await harness.remove(deployment)

"""Shared fixtures: a freshly migrated schema per test, a pool on it, unique RabbitMQ names, clean-ups.

Every name a test gives a deployment comes from ``new_schema`` and ``new_prefix`` (the ``schema`` and
``prefix`` fixtures use them), which remember it for the session. A ``prefix``'s topology is deleted after
its test whatever the test did (``delete_topology``), and at the end of the session ``pytest_sessionfinish``
fails the run if anything named after this run's prefixes and schemas is left on the machine's servers
(``leftovers``), and deletes it: the broker has file handles for a few hundred quorum queues only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator

import aio_pika
import asyncpg
import pytest
import tenacity
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import eventfleet.examples.orders.events  # noqa: F401 - registers the orders events
from projections import registry
from store import db
from store.event_store import EventStore
from tests import tracing
from workers import admin, broker

DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

Cleanup = Callable[[Callable[[], Awaitable[object]]], None]

# The suite runs the orders example, which a deployment gets only when it names it: here, and in every
# process a test starts with this environment (tests of the default remove the variable).
registry.load([registry.EXAMPLE])
os.environ.setdefault("EVENTFLEET_PROJECTION_MODULES", registry.EXAMPLE)
# Every schema of the suite has 4 partitions (16 is the default): each is a quorum queue per projection, and
# the broker's file handles are few (deploy/local/services.sh). Processes a test starts inherit it.
PARTITIONS = 4
os.environ.setdefault("EVENTFLEET_PARTITIONS", str(PARTITIONS))


@dataclasses.dataclass
class Created:
    """The names this session gave its deployments (each with the test that asked for it, when one did):
    what it must leave nothing of."""

    prefixes: dict[str, str] = dataclasses.field(default_factory=dict)
    schemas: dict[str, str] = dataclasses.field(default_factory=dict)

    def add_prefix(self, name: str) -> str:
        self.prefixes[name] = _current_test()
        return name

    def add_schema(self, name: str) -> str:
        self.schemas[name] = _current_test()
        return name

    def owner(self, name: str) -> str:
        """The test that asked for the name ``name`` derives from."""
        for given, test in (*self.prefixes.items(), *self.schemas.items()):
            if name == given or name.startswith((f"{given}.", f"{given}_")):
                return test
        return "?"


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "(no test)").rsplit(" (", 1)[0]


CREATED = Created()


def new_prefix(stem: str = "test") -> str:
    """A RabbitMQ name prefix of its own for a test (``test.<hex>``), remembered for the session check."""
    return CREATED.add_prefix(f"{stem}.{uuid.uuid4().hex[:12]}")


def new_schema(stem: str = "t", length: int = 16) -> str:
    """A schema name of its own for a test (``t_<hex>``), remembered for the session check: the schema, its
    shadows (``<schema>_rb_...``) and its roles (``<schema>_worker``...) must not outlive the session."""
    return CREATED.add_schema(f"{stem}_{uuid.uuid4().hex[:length]}")


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """The root logger as it was before the test: a CLI command run in-process configures it (workers/runtime/
    logs.py), and its handler would print every later test's INFO records into that test's captured stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def database_url() -> str:
    return DATABASE_URL


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
async def cleanup() -> AsyncIterator[Cleanup]:
    """Collect async undo callbacks; run them last-in first-out after the test (aio-pika's add_cleanup)."""
    callbacks: list[Callable[[], Awaitable[object]]] = []
    yield callbacks.append
    for callback in reversed(callbacks):
        await callback()


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A schema of its own for this test, migrated with the store and the read models; dropped after."""
    name = new_schema()
    await admin.run_migrate(DATABASE_URL, name, partitions=PARTITIONS)
    yield name
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pool(schema: str) -> AsyncIterator[db.Pool]:
    async with db.create_pool(DATABASE_URL, schema, min_size=1, max_size=10) as p:
        yield p


@pytest.fixture
async def event_store(pool: db.Pool, schema: str) -> EventStore:
    return EventStore(pool, schema=schema)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test (``get_finished_spans()``), from an SDK tracer provider (tests/tracing.py)."""
    yield from tracing.recording()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A RabbitMQ name prefix of its own for this test; its deployment's queues and exchanges are deleted after
    it, whatever the test declared or deleted itself (``delete_topology``)."""
    name = new_prefix()
    yield name
    await delete_topology(name)


async def delete_topology(prefix: str, projections: Iterable[str] = (), partitions: int = 16) -> None:
    """Delete every queue and exchange a deployment with ``prefix`` may have: the topology of the registered
    projections and of ``projections`` with up to ``partitions`` partitions (queue and exchange deletes of
    names that do not exist are no-ops). A name outside that topology is the session check's to find."""
    n = broker.Names(prefix)
    found = sorted({*registry.load(), *projections})
    queues = [q for p in found for q in (n.queue(p), n.dead_letter_queue(p),
                                         *(n.partition_queue(p, i) for i in range(max(partitions, PARTITIONS))))]
    # The worker group the tests run (EVENTFLEET_GROUP=main): its queues, one per partition.
    queues += [n.group_queue("main", i) for i in range(max(partitions, PARTITIONS))]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in (n.partitions_exchange, n.dead_letter_exchange, n.exchange, n.integration_exchange):
            await channel.exchange_delete(exchange)


@pytest.fixture
async def amqp(request: pytest.FixtureRequest, cleanup: Cleanup) -> AsyncIterator[AbstractRobustConnection]:
    """A RabbitMQ connection named after the test."""
    connection = await aio_pika.connect_robust(AMQP_URL, client_properties={"connection_name": request.node.nodeid})
    yield connection
    await connection.close()


@pytest.fixture
async def delete_prefixed(prefix: str, amqp: AbstractRobustConnection, cleanup: Cleanup) -> Callable[[list[str], list[str]], None]:
    """Register queues and exchanges to delete after the test."""

    def register(queues: list[str], exchanges: list[str]) -> None:
        async def undo() -> None:
            # Its own connection: `cleanup` tears down after the `amqp` fixture has closed its connection.
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                for q in queues:
                    await channel.queue_delete(q)
                for x in exchanges:
                    await channel.exchange_delete(x)

        cleanup(undo)

    return register


# --- the session check: nothing of this run's deployments is left ---------------------------------------------


def _rabbitmq_names(kind: str) -> list[str] | None:
    """The names of the default vhost's queues or exchanges (``rabbitmqctl``, local only), or None when
    rabbitmqctl cannot answer (no such command, another machine's broker)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        ran = subprocess.run(["rabbitmqctl", "-q", f"list_{kind}", "name"], capture_output=True, text=True,
                             timeout=60, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return [line.strip() for line in ran.stdout.splitlines() if line.strip()]


async def _admin_connection() -> asyncpg.Connection:
    """A connection to the test database, waiting out a restart of Postgres (some tests restart it) for 60 s."""
    async for attempt in tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type((OSError, asyncpg.PostgresConnectionError,
                                                    asyncpg.CannotConnectNowError)),
            wait=tenacity.wait_fixed(1), stop=tenacity.stop_after_delay(60), reraise=True):
        with attempt:
            return await asyncpg.connect(DATABASE_URL)
    raise AssertionError("unreachable")  # pragma: no cover - reraise=True


async def _postgres_leftovers(schemas: Iterable[str]) -> tuple[list[str], list[str]]:
    """The schemas and roles named after ``schemas`` (themselves, or ``<schema>_...``) that exist."""
    names = sorted(schemas)
    patterns = [name.replace("_", r"\_") + r"\_%" for name in names]
    conn = await _admin_connection()
    try:
        found = [r["nspname"] for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = any($1::text[]) OR nspname LIKE any($2::text[])",
            names, patterns)]
        found_roles = [r["rolname"] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = any($1::text[]) OR rolname LIKE any($2::text[])",
            names, patterns)]
    finally:
        await conn.close()
    return sorted(found), sorted(found_roles)


def leftovers(created: Created) -> dict[str, list[str]]:
    """What of this session's deployments exists now: queues and exchanges named ``<prefix>`` or
    ``<prefix>.…``, schemas and roles named ``<schema>`` or ``<schema>_…`` (empty lists when all is gone)."""
    left: dict[str, list[str]] = {}

    def ours(name: str) -> bool:  # some tests name their prefix after their schema
        return any(name == p or name.startswith(f"{p}.") for p in (*created.prefixes, *created.schemas))

    for kind in ("queues", "exchanges"):
        names = _rabbitmq_names(kind) if created.prefixes or created.schemas else []
        left[kind] = sorted(n for n in names or [] if ours(n))
    left["schemas"], left["roles"] = (asyncio.run(_postgres_leftovers(created.schemas)) if created.schemas
                                      else ([], []))
    return left


async def remove_leftovers(left: dict[str, list[str]]) -> None:
    """Delete what ``leftovers`` found, so the next run starts from a clean machine."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in left["queues"]:
            await channel.queue_delete(queue)
        for exchange in left["exchanges"]:
            await channel.exchange_delete(exchange)
    conn = await _admin_connection()
    try:
        for schema in left["schemas"]:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for role in left["roles"]:
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await conn.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when it left a queue, exchange, schema or role of its own deployments (and remove them)."""
    if not CREATED.prefixes and not CREATED.schemas:
        return
    left: dict[str, list[str]] = {}
    try:
        left = leftovers(CREATED)
        if not any(left.values()):
            return
        asyncio.run(remove_leftovers(left))
        removed = "now removed"
    except Exception as exc:  # noqa: BLE001 - a server gone at the end: say so, and fail the run
        removed = f"could not check or remove: {type(exc).__name__}: {exc}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"  {kind}: {name} (from {CREATED.owner(name)})" for kind, names in left.items() for name in names]
    message = "\n".join([f"this run left these behind ({removed}): every test must tear down its deployment",
                         *lines])
    if reporter is not None:
        reporter.write_sep("=", "leftovers", red=True)
        reporter.write_line(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""The outbox relay: publishes committed outbox rows to RabbitMQ, at least once, never at most once.

One batch is one transaction: claim the oldest rows ``FOR UPDATE SKIP LOCKED`` (with their events),
publish every message pipelined on a confirming channel (persistent, mandatory), wait for all the
confirms, delete the rows and commit. A nack, a return (unroutable), a lost connection or a timeout
rolls the transaction back, so the rows stay and are published again.

Ordering. One relay publishes its batches one after the other, each in ``global_position`` order, on
one channel; a stream's positions grow with its versions, so one relay publishes each stream in version
order (after a failed batch the same rows come first again, so a retry repeats, never reorders).
Several relays claim disjoint batches and publish them concurrently, so across relays a later event of
a stream can reach the queue before an earlier one. Workers restore per-stream order from versions
(checkpoints and gap filling): across relays, ordering is an efficiency matter, not a correctness one.

Duplicates. A message is published twice only when its batch was published (wholly or partly) and
then not committed: the relay died, or Postgres or RabbitMQ failed between the first publish and the
commit. So every such failure duplicates at most one batch (``batch_size`` messages) of that relay,
and a relay that never fails publishes every row exactly once (SKIP LOCKED: no two relays hold a row).

Clusters and flow control. ``config.amqp_urls`` may name several nodes: each session connects to the first
that answers, trying the node of the session before last (``amqp.connect``), with an AMQP heartbeat, so a
silent node ends the session like a lost one. A memory or disk alarm makes the broker block publishing
(``connection.blocked``): the relay rolls the batch in flight back at once (its rows stay), claims nothing,
reports it (``/readyz`` 503, ``eventfleet_relay_blocked`` 1, one log line each way) and resumes on
``connection.unblocked``, on the same connection.

Bad rows. A row whose event cannot be encoded into a message (its metadata is not msgpack: something
wrote it around the store's API) neither stops the relay nor is dropped: it is published flagged as
undecodable, logged with its event id and counted, and every projection dead-letters it (``encode_rows``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from aio_pika.abc import AbstractConnection

from projections import registry
from store import db, notify
from store import errors as store_errors
from store.queries import load
from workers import broker
from workers.config import Settings
from workers.errors import BrokerUnavailable
from workers.relay.publish import Published, publish_claim, refresh_backlog

SQL = load("workers", "relay.sql")
from workers.runtime import amqp, health, lifecycle, redact, retry

logger = logging.getLogger(__name__)

#: Seconds a batch's confirms may take before it is rolled back (RelayConfig.confirm_timeout).
CONFIRM_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class RelayConfig:
    """Where to read and publish, and the relay's tuning knobs."""

    database_url: str
    schema: str
    amqp_url: str  # the first of amqp_urls
    prefix: str
    projections: tuple[str, ...]
    batch_size: int = 1000
    poll_interval: float = 1.0  # fallback when a NOTIFY is lost (the relay was not listening)
    metrics_interval: float = 5.0  # how often the backlog gauges are refreshed
    confirm_timeout: float = CONFIRM_TIMEOUT  # a batch whose confirms take longer is rolled back
    stop_timeout: float = 10.0  # on SIGTERM, time the batch in flight gets to commit
    partitions: int | None = None  # P; None: the schema's (read once per session)
    events_exchange: bool = False  # also publish one message per event to the topic exchange
    #: The worker group whose shared queues the relay declares (EVENTFLEET_GROUP), instead of a queue per
    #: projection per partition; None: the latter.
    group: str | None = None
    message_events: int = 100
    message_bytes: int = 1024 * 1024
    amqp_urls: tuple[str, ...] = ()  # every node's URL, tried in turn (amqp.connect); () = (amqp_url,)
    #: The limits of the relay's Postgres sessions (``lifecycle.session_timeouts``); none unless from_settings.
    timeouts: db.Timeouts = dataclasses.field(default_factory=db.Timeouts)
    batch_bytes: int = 16 * 1024 * 1024  # event bytes per claim (the event reaching it included)

    def __post_init__(self) -> None:
        if not self.amqp_urls:
            object.__setattr__(self, "amqp_urls", (self.amqp_url,))
        elif self.amqp_urls[0] != self.amqp_url:
            raise ValueError("RelayConfig.amqp_url must be the first of amqp_urls")

    def __repr__(self) -> str:
        # Both URLs carry passwords: a logged or printed configuration must not show them.
        return redact.fields(self)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RelayConfig:
        """The relay's configuration for a deployment: every registered projection gets its queue."""
        fields: dict[str, Any] = {
            "database_url": settings.database_url, "schema": settings.schema,
            "amqp_url": settings.amqp_url, "amqp_urls": settings.amqp_urls, "prefix": settings.prefix,
            "projections": tuple(registry.load(settings.projection_modules)), "batch_size": settings.relay_batch_size,
            "batch_bytes": settings.relay_batch_bytes,
            "poll_interval": settings.relay_poll_ms / 1000, "stop_timeout": settings.stop_timeout,
            "events_exchange": settings.events_exchange, "message_events": settings.message_events,
            "group": settings.group,
            "message_bytes": settings.message_bytes,
        }
        fields |= overrides
        if "timeouts" not in overrides:
            # The claim's transaction idles while the broker confirms (at most confirm_timeout): a frozen
            # relay's claim (its outbox rows, its transaction id) ends that long after a worker's would.
            confirming = float(fields.get("confirm_timeout", CONFIRM_TIMEOUT))
            fields["timeouts"] = lifecycle.session_timeouts(settings, busy_idle=confirming)
        return cls(**fields)


# --- the forever loop ---------------------------------------------------------------------------------


class _Interrupted(Exception):
    """An outage ended a session that had been working: reconnect at once, with a fresh backoff."""


@dataclasses.dataclass
class _Session:
    """The connections of one session; callbacks record a loss or the broker's block and wake the loop."""

    wake: asyncio.Event
    status: health.Health
    lost: BaseException | None = None
    progressed: bool = False
    blocked: str | None = None  # the broker's reason while it blocks publishing
    blocking: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set while blocked

    def on_lost(self, cause: BaseException) -> None:
        self.lost = self.lost or cause
        self.wake.set()

    def on_blocked(self, reason: str) -> None:
        self.blocked = reason
        self.blocking.set()
        self.status.blocked(reason)
        self.wake.set()

    def on_unblocked(self) -> None:
        self.blocked = None
        self.blocking.clear()
        self.status.unblocked()
        self.wake.set()

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost


async def run_relay(pool: db.Pool, config: RelayConfig, status: health.Health, *,
                    idle: asyncio.Event | None = None) -> None:
    """Publish the outbox until cancelled, outliving outages of Postgres and RabbitMQ.

    Each outage is logged once with its cause (``status.down``) and ends readiness until the relay is
    connected again; reconnection backs off with jitter (``retry.retry_forever``), without limit.
    ``idle`` (for tests) is set whenever the relay finds nothing to claim and goes to sleep.
    On cancellation the batch in flight gets ``config.stop_timeout`` to commit, else it is rolled back.
    """
    while True:
        try:
            async for attempt in retry.retry_forever():
                with attempt:
                    await _run_session(pool, config, status, idle)
        except _Interrupted:
            continue


async def _run_session(pool: db.Pool, config: RelayConfig, status: health.Health,
                       idle: asyncio.Event | None) -> None:
    session = _Session(asyncio.Event(), status)
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(_forget_block, session)
            partitions = config.partitions or await _partitions(pool)
            targets = await _open_broker(stack, config, session, partitions)
            await _open_listener(stack, config, session)
            await refresh_backlog(pool)
            status.up("postgres")
            await _relay_loop(pool, targets, config, session, idle)
    except retry.OUTAGE_ERRORS as exc:
        service = "postgres" if isinstance(exc, store_errors.TransientError) else "rabbitmq"
        status.down(service, exc)
        if service == "postgres":
            await pool.expire_connections()  # every pooled connection is suspect after a Postgres outage
        if session.progressed:
            raise _Interrupted from exc
        raise


async def _partitions(pool: db.Pool) -> int:
    """P of the schema; a schema not migrated yet is an outage of its own kind: retried, reported."""
    async with db.translate_errors():
        count: int | None = await pool.fetchval(SQL["partitions"])
    if not count:
        raise store_errors.TransientError("the schema records no partitions yet: run `eventfleet migrate`")
    return count


async def _relay_loop(pool: db.Pool, targets: broker.Targets, config: RelayConfig, session: _Session,
                      idle: asyncio.Event | None) -> None:
    next_refresh = time.monotonic() + config.metrics_interval
    while True:
        session.wake.clear()  # before claiming: a NOTIFY from now on wakes the next wait
        while True:
            await _wait_unblocked(pool, config, session)
            published = await _publish_finishing_on_stop(pool, targets, config, session)
            session.progressed = True
            session.check()
            if published is None:  # blocked mid-batch: rolled back; claim again once unblocked
                continue
            n = published.events
            if time.monotonic() >= next_refresh:
                await refresh_backlog(pool)
                next_refresh = time.monotonic() + config.metrics_interval
            if not published.full:  # drained (or the rest is claimed by other relays)
                break
        if idle is not None and n == 0:
            idle.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.poll_interval):  # the fallback: a NOTIFY can be lost
                await session.wake.wait()
        if idle is not None:
            idle.clear()
        session.check()


async def _publish_finishing_on_stop(pool: db.Pool, targets: broker.Targets, config: RelayConfig,
                                     session: _Session) -> Published | None:
    """publish_claim, but a cancellation (SIGTERM) lets it finish for up to stop_timeout first; None when the
    broker blocked publishing before it was confirmed (it is rolled back at once: no confirm comes before
    the alarm clears, and an open claim would hold its rows and the store's horizon meanwhile)."""
    task = asyncio.ensure_future(
        publish_claim(pool, targets, config.batch_size, confirm_timeout=config.confirm_timeout,
                      batch_bytes=config.batch_bytes))
    blocked = asyncio.ensure_future(session.blocking.wait())
    try:
        await asyncio.wait({task, blocked}, return_when=asyncio.FIRST_COMPLETED)  # neither is cancelled by a stop
    except asyncio.CancelledError:
        # Committing now saves republishing the batch; past the timeout it is cancelled: rolled back.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, config.stop_timeout)
        raise
    finally:
        blocked.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *retry.OUTAGE_ERRORS):
        await task
    logger.info("batch rolled back: the broker blocks publishing", extra={"reason": session.blocked})
    return None


async def _wait_unblocked(pool: db.Pool, config: RelayConfig, session: _Session) -> None:
    """While the broker blocks publishing: claim nothing, keep the backlog gauges fresh, until it unblocks
    (or the session ends)."""
    while session.blocked is not None:
        session.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.metrics_interval):
                await session.wake.wait()
        session.check()
        await refresh_backlog(pool)


def _forget_block(session: _Session) -> None:
    """A session's end takes its connection's block with it (the next connection is told anew)."""
    if session.blocked is not None:
        session.status.unblocked(quiet=True)


async def _open_broker(stack: contextlib.AsyncExitStack, config: RelayConfig,
                       session: _Session, partitions: int) -> broker.Targets:
    """Connect to a node (not robust: this loop owns reconnection; ``amqp.connect`` tries the previous session's
    node last), watch its flow control, open a confirming channel, declare the topology."""
    connection = await amqp.connect(config.amqp_urls, name=f"eventfleet relay {config.prefix}",
                                    after=session.status.broker)
    stack.push_async_callback(_close_quietly, connection)
    amqp.watch_blocked(connection, session.on_blocked, session.on_unblocked)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    lost = _on_close(session, lambda exc: BrokerUnavailable(f"connection lost: {exc!r}"))
    connection.close_callbacks.add(lost)
    channel.close_callbacks.add(lost)
    targets = await broker.declare_topology(
        channel, broker.Names(config.prefix), config.projections, partitions, events_exchange=config.events_exchange,
        message_events=config.message_events, message_bytes=config.message_bytes, group=config.group)
    session.status.up("rabbitmq", broker=amqp.connection_endpoint(connection))
    return targets


async def _open_listener(stack: contextlib.AsyncExitStack, config: RelayConfig, session: _Session) -> None:
    """LISTEN on the store's channel on a dedicated connection; a NOTIFY or the connection's end wakes us."""
    conn = await db.connect(config.database_url, config.schema, application_name=application_name(config.schema))
    stack.push_async_callback(_close_listener, conn)
    async with db.translate_errors():
        await conn.add_listener(notify.channel(config.schema), lambda *_: session.wake.set())
    conn.add_termination_listener(
        lambda _: session.on_lost(store_errors.TransientError("LISTEN connection to Postgres lost")))


def _on_close(session: _Session, cause: Callable[[BaseException | None], BaseException]
              ) -> Callable[[Any, BaseException | None], None]:
    def callback(_sender: Any, exc: BaseException | None) -> None:
        session.on_lost(cause(exc))
    return callback


async def _close_quietly(connection: AbstractConnection) -> None:
    # Closing a connection the broker already dropped can raise or hang: neither matters any more.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), 5)


async def _close_listener(conn: asyncpg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 5)
    if not conn.is_closed():
        conn.terminate()


def application_name(schema: str) -> str:
    """How the relay's Postgres sessions show in pg_stat_activity (per deployment schema)."""
    return f"eventfleet relay {schema}"[:63]


def open_pool(config: RelayConfig) -> contextlib.AbstractAsyncContextManager[db.Pool]:
    """The relay's pool: one connection for batches, one for the gauges, named after the relay.

    min_size=0: creating it needs no Postgres, so a relay started during an outage waits in the retry
    loop (and answers signals) instead of failing.
    """
    return db.create_pool(config.database_url, config.schema, min_size=0, max_size=2,
                          application_name=application_name(config.schema), timeouts=config.timeouts,
                          settings=SESSION_SETTINGS)


#: The relay's session: no sequential scans. Postgres keeps a generic plan of the claim after a few runs, and one
#: planned while the outbox was near empty (the relay keeps it so) scans the whole outbox to find the rows it
#: deletes; after a broker outage has let a backlog grow, every claim would pay for all of it. Every relay
#: statement has an index (or a ctid) to go by; ``count(*)`` of the gauges walks the outbox's primary key.
SESSION_SETTINGS = {"enable_seqscan": "off"}



"""``eventfleet teardown``: drop everything of one deployment, and nothing of any other.

A deployment is its schema; the shadow schemas of its rebuilds and verifying replays (``shadow_schema``:
``<schema>_rb_<projection>``, ``_vf_``, hashed down to 63 characters when long); its exchanges and, per
projection, the queue and dead-letter queue ``declare_topology`` declares; and the group roles of
``migrate --roles``. ``plan`` finds what of that exists, ``tear_down`` drops it.

Names alone do not tell deployments apart: ``app_rb_x`` is a valid schema of a deployment of its own and
also the shadow name of a projection ``x`` of ``app``, and a hashed shadow name keeps only the first 40
characters of its schema. So a schema is taken for a shadow only if it is not a deployment itself (no
``schema_migrations``) and its name is the shadow name of a projection of this deployment: of the one its
rebuild cursor was started for, when it has one (a killed rebuild's, and the replays'), else of a
registered projection or one with a status row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import LiteralString, cast

import asyncpg
from aio_pika.abc import AbstractConnection

from projections import registry
from store import db, names, queries, roles
from store import errors as store_errors
from workers import broker, errors, locks
from workers.projector import leases
from workers.rebuild.shadow import shadow_schema
from workers.relay.session import application_name

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "teardown.sql")
KINDS = ("rb", "vf")  # a rebuild's shadow, a verifying replay's scratch schema


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What of a deployment exists now, so what ``tear_down`` drops."""

    schema: str
    prefix: str
    projections: tuple[str, ...]  # registered or with a status row: their queues are deleted
    shadows: tuple[str, ...]
    queues: tuple[str, ...]  # those of ``projections`` that exist
    exchanges: tuple[str, ...]  # those that exist
    roles: tuple[str, ...]  # those that exist (roles are cluster-wide)
    #: What still uses the deployment: workers with an unexpired heartbeat, the relays' sessions (their pids,
    #: by application_name) and the outbox rows a relay's batch holds claimed. ``tear_down`` refuses unless
    #: all are empty or it is forced.
    live_workers: tuple[str, ...] = ()
    relay_sessions: tuple[int, ...] = ()
    claimed_rows: int = 0

    @property
    def in_use(self) -> str | None:
        """What of the deployment is live, in words; None when nothing is."""
        users = []
        if self.live_workers:
            users.append(f"live workers {', '.join(self.live_workers)}")
        if self.relay_sessions:
            users.append(f"relay sessions (pids {', '.join(map(str, self.relay_sessions))})")
        if self.claimed_rows:
            users.append(f"{self.claimed_rows} outbox rows claimed by a relay's batch")
        return "; ".join(users) or None


@dataclasses.dataclass(frozen=True, slots=True)
class TornDown:
    """What ``tear_down`` did: the plan, less the roles it kept because something outside still uses them."""

    plan: Plan
    dropped_roles: tuple[str, ...]
    kept_roles: tuple[str, ...]


def _sql(name: str, **identifiers: str) -> LiteralString:
    """A statement of teardown.sql with its {placeholders} filled with validated, double-quoted names."""
    statement = SQL[name]
    for key, value in identifiers.items():
        # Derived names (shadows) may use Postgres's whole 63 characters; roles are checked by store.roles.
        quoted = names.quote(value, max_length=names.MAX_DERIVED_LENGTH)
        statement = cast(LiteralString, statement.replace(f"{{{key}}}", quoted))  # type: ignore[redundant-cast]
    return statement


async def plan(database_url: str, schema: str, prefix: str, amqp: AbstractConnection,
               also: Iterable[str] = (), *, groups: Iterable[str] = ()) -> Plan:
    """Find what of the deployment exists; raise ``TeardownRefused`` unless ``schema`` is a migrated one.
    ``also`` adds projections to the registered ones (a supervisor whose processes load modules it does not);
    ``groups`` adds worker groups (``EVENTFLEET_GROUP``) to those whose partitions were leased."""
    n = broker.Names(prefix)
    conn = await db.connect(database_url, schema)
    try:
        async with db.translate_errors():
            state = await conn.fetchrow(SQL["deployment"], schema)
            assert state is not None
            if not state["migrated"]:
                what = "is not an eventfleet deployment (no schema_migrations)" if state["present"] else "does not exist"
                raise errors.TeardownRefused(f"schema {schema!r} {what}; nothing dropped")
            rows = await conn.fetch(_sql("status_projections", schema=schema))
            # A status row's name that is no identifier never had queues or shadows (both derive from it).
            projections = tuple(sorted(p for p in {*registry.load(), *also} | {r["projection"] for r in rows}
                                       if _is_identifier(p)))
            shadows = await _shadows(conn, schema, projections)
            found_roles = tuple([r for r in roles.Roles(schema).all()
                                 if await conn.fetchval(roles.SQL["role_exists"], r)])
            partitions = await conn.fetchval(SQL["partitions"]) or 0
            leased = await leases.groups(conn)
            users = await _users(conn, schema)
    finally:
        await conn.close()
    # The partition queues, and the queue of its own each projection had before partitions.
    queues = [q for p in projections
              for q in (*(n.partition_queue(p, i) for i in range(partitions)), n.queue(p), n.dead_letter_queue(p))]
    # The worker groups' queues (EVENTFLEET_GROUP): each fed every read model its workers ran.
    queues += [n.group_queue(g, i) for g in sorted({*groups, *leased}) for i in range(partitions)]
    exchanges = [n.partitions_exchange, n.exchange, n.dead_letter_exchange, n.integration_exchange]
    return Plan(schema, prefix, projections, shadows, tuple(await _existing(amqp, queues, queue=True)),
                tuple(await _existing(amqp, exchanges, queue=False)), found_roles, *users)


async def _users(conn: db.Conn, schema: str) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """The live workers, the relays' session pids and the claimed outbox rows of the deployment (see Plan)."""
    workers = tuple(r["worker_id"] for r in await conn.fetch(SQL["live_workers"]))
    relays = tuple(r["pid"] for r in await conn.fetch(SQL["relay_sessions"], application_name(schema)))
    async with conn.transaction():  # the probe's row locks end here, at once
        claimed: int = await conn.fetchval(SQL["claimed_outbox_rows"])
    return workers, relays, claimed


async def _shadows(conn: db.Conn, schema: str, projections: Sequence[str]) -> tuple[str, ...]:
    """The shadow schemas of this deployment that exist (see the module doc for the rule)."""
    known = _shadow_names(schema, projections)
    found = []
    for row in await conn.fetch(SQL["shadow_candidates"], sorted(known), f"{schema}_rb_", f"{schema}_vf_"):
        name = row["name"]
        if row["is_deployment"] or name == schema:
            continue
        started_for = await _cursor_projections(conn, name) if row["has_cursor"] else []
        if name in (_shadow_names(schema, started_for) if started_for else known):
            found.append(name)
    return tuple(found)


async def _cursor_projections(conn: db.Conn, shadow: str) -> list[str]:
    """The projections a shadow's rebuild cursor names; none if it cannot be read (then its name alone decides)."""
    if not _is_identifier(shadow, max_length=names.MAX_DERIVED_LENGTH):  # not a name this code derives
        return []
    try:
        return [r["projection"] for r in await conn.fetch(_sql("cursor_projections", schema=shadow))]
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedTableError):
        return []


def _shadow_names(schema: str, projections: Iterable[str]) -> set[str]:
    """The shadow names of these projections of ``schema``, of both kinds."""
    return {shadow_schema(schema, p, kind) for p in projections if _is_identifier(p) for kind in KINDS}


def _is_identifier(name: str, *, max_length: int = names.MAX_IDENTIFIER_LENGTH) -> bool:
    try:
        names.identifier(name, max_length=max_length)
    except store_errors.InvalidName:
        return False
    return True


async def _existing(amqp: AbstractConnection, candidates: Sequence[str], *, queue: bool) -> list[str]:
    """The queues (or exchanges) of ``candidates`` that exist, by passive declare."""
    found = []
    for name in candidates:
        if (await broker.passive_queue(amqp, name) is not None) if queue else await broker.exchange_exists(amqp, name):
            found.append(name)
    return found


async def tear_down(database_url: str, plan: Plan, amqp: AbstractConnection, *, force: bool = False) -> TornDown:
    """Delete the plan's queues and exchanges, then drop its schemas and roles in one transaction.

    Refused (``TeardownRefused``, nothing dropped) while the plan found the deployment in use (``Plan.in_use``:
    its relays and workers would crash on the missing tables), unless ``force``.

    The broker goes first: if Postgres then fails, the schema and its status rows are still there for a
    second run to find the same projections. A role still granted something outside the dropped schemas
    (another database's deployment of the same schema name shares it) is kept and reported.
    """
    if plan.in_use is not None and not force:
        raise errors.TeardownRefused(
            f"schema {plan.schema!r} is in use: {plan.in_use}; stop the relays and workers first (a stopped "
            f"worker's heartbeat expires within EVENTFLEET_LEASE_SECONDS), or pass --force; nothing dropped")
    channel = await amqp.channel()
    try:
        for queue in plan.queues:
            await channel.queue_delete(queue)
        for exchange in plan.exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await channel.close()
    conn = await db.connect(database_url, plan.schema)
    try:
        async with db.translate_errors(), conn.transaction():
            await conn.execute(SQL["lock_timeout"])
            await locks.take(conn, locks.migrate(plan.schema))  # not while a migrate of it runs
            for shadow in plan.shadows:
                await conn.execute(_sql("drop_schema", schema=shadow))
            await conn.execute(_sql("drop_schema", schema=plan.schema))
            dropped, kept = await _drop_roles(conn, plan.roles)
    finally:
        await conn.close()
    logger.info("deployment torn down", extra={
        "schema": plan.schema, "prefix": plan.prefix, "shadows": list(plan.shadows), "queues": list(plan.queues),
        "exchanges": list(plan.exchanges), "roles_dropped": dropped, "roles_kept": kept})
    return TornDown(plan, tuple(dropped), tuple(kept))


async def _drop_roles(conn: db.Conn, found: Iterable[str]) -> tuple[list[str], list[str]]:
    dropped, kept = [], []
    for role in found:
        try:
            async with conn.transaction():  # a savepoint: a kept role does not undo the rest
                await conn.execute(roles.render(SQL["drop_role"], role=role))
            dropped.append(role)
        except asyncpg.DependentObjectsStillExistError as exc:
            logger.warning("role kept: still in use outside this deployment", extra={"role": role,
                                                                                     "detail": str(exc)})
            kept.append(role)
    return dropped, kept


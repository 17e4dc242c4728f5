"""Least-privilege group roles of a deployment: ``<schema>_writer``, ``_relay``, ``_worker`` and ``_reactor``.

``eventfleet migrate --roles`` (run by the schema's owner, which needs CREATEROLE) creates the missing
roles as NOLOGIN groups and (re)grants their privileges, so running it again after a new migration or
projection brings the grants up to date. Each service then logs in as its own LOGIN role that is a
member of one group (a worker running reactors: of ``<schema>_reactor``, itself a member of
``<schema>_worker``, so it has the worker's rights and the reactor's). The statements live in
``store/sql/roles.sql``; only validated, quoted identifiers are substituted into them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from typing import LiteralString

import asyncpg

from store import db, errors, migrate, names, queries

logger = logging.getLogger(__name__)

SQL = queries.load("store", "roles.sql")
KINDS = ("writer", "relay", "worker", "reactor")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True, slots=True)
class Roles:
    """The group role names of one schema."""

    schema: str

    def __post_init__(self) -> None:
        names.identifier(self.schema, what="schema")

    @property
    def writer(self) -> str:
        return f"{self.schema}_writer"

    @property
    def relay(self) -> str:
        return f"{self.schema}_relay"

    @property
    def worker(self) -> str:
        return f"{self.schema}_worker"

    @property
    def reactor(self) -> str:
        return f"{self.schema}_reactor"

    def all(self) -> tuple[str, str, str, str]:
        """Every group role, members after the roles they are members of (the order ``apply`` creates them in)."""
        return self.writer, self.relay, self.worker, self.reactor


def render(template: LiteralString, **identifiers: str) -> LiteralString:
    """Fill the {placeholders} of a roles.sql block with double-quoted identifiers.

    Every value is a schema or table name validated by ``names.identifier`` or a role name built from a
    validated schema and a fixed suffix (at most 56 characters, under Postgres's 63), so the quoted
    result is as trusted as a literal. ``role`` and ``group`` are role names.
    """
    quoted = {}
    for key, value in identifiers.items():
        if key in ("role", "group"):
            schema, _, kind = value.rpartition("_")
            if kind not in KINDS:
                raise errors.InvalidName(
                    f"invalid role {value!r}: not <schema>_writer, _relay, _worker or _reactor")
            names.identifier(schema, what="schema")
        else:
            names.identifier(value, what=key)
        quoted[key] = f'"{value}"'
    # mypy treats LiteralString as str, so no cast is needed (or allowed) to keep the annotation.
    return _PLACEHOLDER.sub(lambda m: quoted[m.group(1)], template)


def statements(schema: str, read_model_tables: Iterable[str]) -> list[LiteralString]:
    """The GRANT statements of every role of ``schema``, in the order ``apply`` runs them."""
    roles = Roles(schema)
    found: list[LiteralString] = [
        render(SQL["grant_writer"], schema=schema, role=roles.writer),
        render(SQL["grant_relay"], schema=schema, role=roles.relay),
        render(SQL["grant_worker"], schema=schema, role=roles.worker),
        render(SQL["grant_reactor"], schema=schema, role=roles.reactor, group=roles.worker),
    ]
    for table in dict.fromkeys(read_model_tables):
        found.append(render(SQL["grant_worker_read_model"], schema=schema, table=table, role=roles.worker))
    return found


async def apply(conn: db.Conn, schema: str, read_model_tables: Iterable[str]) -> list[str]:
    """Create the missing group roles of ``schema`` and grant their privileges; return the roles created.

    Runs in one transaction under the schema's migrate lock. Roles are cluster-wide: a deployment in
    another database with the same schema name shares them (give deployments distinct schema names).
    """
    roles = Roles(schema)
    grants = statements(schema, read_model_tables)
    created: list[str] = []
    async with db.translate_errors(), conn.transaction():
        await conn.execute(SQL["lock"], migrate.lock_key(schema))
        for role in roles.all():
            if await conn.fetchval(SQL["role_exists"], role):
                continue
            try:
                # A savepoint: another database's migrate may create the same role at the same moment.
                async with conn.transaction():
                    await conn.execute(render(SQL["create_role"], role=role))
            except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                continue
            except asyncpg.InsufficientPrivilegeError as exc:
                raise errors.StoreError(
                    f"creating role {role} needs CREATEROLE; have an administrator create the roles "
                    f"(see store/sql/roles.sql) or grant CREATEROLE to the migrating role ({exc})") from exc
            created.append(role)
        for grant in grants:
            await conn.execute(grant)
    logger.info("roles granted", extra={"schema": schema, "roles_created": created})
    return created


async def grant_read_models(conn: db.Conn, schema: str, tables: Iterable[str]) -> bool:
    """Grant ``<schema>_worker`` its privileges on these read-model tables, if that role exists (the
    reactor role has them as its member).

    A rebuild replaces read-model tables with new ones, which carry no grants: it calls this in the
    swap's transaction. Returns False (and grants nothing) when the deployment does not use the roles.
    """
    worker = Roles(schema).worker
    statements_ = [render(SQL["grant_worker_read_model"], schema=schema, table=t, role=worker)
                   for t in dict.fromkeys(tables)]
    async with db.translate_errors():
        if not await conn.fetchval(SQL["role_exists"], worker):
            return False
        for statement in statements_:
            await conn.execute(statement)
    return True

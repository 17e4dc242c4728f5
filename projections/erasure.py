"""Read models forgetting a subject: the default handler of ``SubjectForgotten`` for declared personal columns.

A projection that copies personal values into its tables declares where they are, per table, with the column
holding the subject's id::

    personal = {"contacts": ("customer_id", ("email", "phone"))}

On ``SubjectForgotten(S)`` (stream ``subject-S``, through the same exactly-once path as every event) the
default handler sets those columns of the rows whose subject column holds S to their erased value: NULL in a
nullable column, the empty value (``''``: text, varchar or bytea) in a ``NOT NULL`` one. Rows stay: counts,
sums and the subject's id (which ``forget`` does not erase either) remain exact. The erased value depends on
the column only, never on what it held, so a read model and a replay of the store (where the subject's events
already decode to erased values, then the same handler runs) end with the same rows, whatever order the
worker met the subject's streams in: ``verify`` compares them as usual, and also checks that no row of a
forgotten subject holds a non-empty value in a declared column (``forgotten_residue``).

A projection that must do something else (delete the rows, recompute a summary) writes its own
``@handles(SubjectForgotten)`` handler, which replaces the default; it may call ``erase_declared`` too.
Personal columns are text, varchar or bytea (the types of personal fields: str, bytes, optional).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from store import db, errors, names

#: table -> (subject column, personal columns): what ``Projection.personal`` declares.
Declared = Mapping[str, tuple[str, tuple[str, ...]]]

_COLUMNS = """
SELECT a.attname AS name, a.attnotnull AS not_null, a.atttypid::regtype::text AS type
FROM pg_attribute AS a
WHERE a.attrelid = $1::regclass AND a.attname = ANY($2::text[]) AND a.attnum > 0 AND NOT a.attisdropped
"""
_INTEGERS = frozenset({"smallint", "integer", "bigint"})


def validate(owner: str, declared: Declared, tables: tuple[str, ...] | None) -> None:
    """TypeError unless every declared table is one of ``tables`` and every name a safe identifier."""
    for table, spec in declared.items():
        if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], tuple) and spec[1]):
            raise TypeError(f"{owner}.personal[{table!r}] must be (subject_column, (column, ...))")
        subject, columns = spec
        try:
            for name in (table, subject, *columns):
                names.identifier(name, what="personal table or column")
        except errors.InvalidName as exc:
            raise TypeError(f"{owner}.personal: {exc}") from exc
        if tables is not None and table not in tables:
            raise TypeError(f"{owner}.personal names table {table!r}, which is not one of its tables {tables!r}")
        if subject in columns:
            raise TypeError(f"{owner}.personal[{table!r}]: the subject column cannot itself be personal")


async def erase_declared(conn: db.Conn, declared: Declared, subject: str) -> int:
    """Set the declared personal columns of subject's rows to their erased values; the rows changed."""
    changed = 0
    for table, (subject_column, columns) in declared.items():
        catalog = {r["name"]: r for r in await conn.fetch(_COLUMNS, names.quote(table),
                                                          [subject_column, *columns])}
        missing = [c for c in (subject_column, *columns) if c not in catalog]
        if missing:
            raise errors.InvalidInput(f"personal columns {missing!r} are not columns of table {table!r}")
        key = _subject_value(subject, catalog[subject_column]["type"])
        if key is None:
            continue  # a subject id that cannot be in this column (not an int, not a UUID): no row to erase
        sets = ", ".join(f"{names.quote(c)} = {_erased(catalog[c]['not_null'])}" for c in columns)
        # Identifiers validated and quoted; the erased values are literals of this module; the subject a parameter.
        sql = f"UPDATE {names.quote(table)} SET {sets} WHERE {names.quote(subject_column)} = $1"
        status = await conn.execute(sql, key)
        changed += int(status.rpartition(" ")[2] or 0)
    return changed


def residue_sql(schema: str, table: str, subject_column: str, columns: tuple[str, ...]) -> str:
    """A query of the subject ids (as text) of rows in ``schema.table`` that belong to a forgotten subject
    (a tombstone in ``schema.subject_keys``) and hold a non-empty value in a declared personal column."""
    qualified = f"{names.quote(schema, max_length=names.MAX_DERIVED_LENGTH)}.{names.quote(table)}"
    keys = f"{names.quote(schema, max_length=names.MAX_DERIVED_LENGTH)}.subject_keys"
    held = " OR ".join(f"({names.quote(c)} IS NOT NULL AND octet_length({names.quote(c)}) > 0)" for c in columns)
    subject = f"t.{names.quote(subject_column)}::text"
    return (f"SELECT {subject} AS subject FROM {qualified} AS t JOIN {keys} AS k ON k.subject = {subject} "
            f"WHERE k.wrapped_key IS NULL AND ({held})")


def _erased(not_null: bool) -> str:
    return "''" if not_null else "NULL"


def _subject_value(subject: str, column_type: str) -> Any:
    """The subject id as the subject column's type takes it (None when it cannot be one of its values)."""
    if column_type in _INTEGERS:
        try:
            return int(subject)
        except ValueError:
            return None
    if column_type == "uuid":
        try:
            return uuid.UUID(subject)
        except ValueError:
            return None
    return subject

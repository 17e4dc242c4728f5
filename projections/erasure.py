"""Read models forgetting a subject: the default handler of ``SubjectForgotten`` for declared personal columns.

A projection that copies personal values into its tables declares where they are, per table, with the column
holding the subject's id::

    personal = {"contacts": ("customer_id", ("email", "phone"))}

On ``SubjectForgotten(S)`` (stream ``subject-S``, through the same exactly-once path as every event) the
default handler sets those columns of the rows whose subject column holds S to their erased value: NULL in a
nullable column, the empty value (``''``: text, varchar or bytea) in a ``NOT NULL`` one, in one statement per
table (no catalog round trip: a rebuild batches it). Rows stay: counts, sums and the subject's id (which
``forget`` does not erase either) remain exact. The erased value depends on the column only, never on what it
held, so a read model and a replay of the store (where the subject's events already decode to erased values,
then the same handler runs) end with the same rows, whatever order the worker met the subject's streams in:
``verify`` compares them as usual, and also checks that no row of a forgotten subject holds a non-empty value
in a declared column (``residue_sql``; ``workers.admin.verify.Residue``).

A projection that must do something else (delete the rows, recompute a summary) writes its own
``@handles(SubjectForgotten)`` handler, which replaces the default; it may call ``erase_declared`` too.
Personal columns are text, varchar or bytea (the types of personal fields: str, bytes, optional).
"""

from __future__ import annotations

from collections.abc import Mapping

from store import db, errors, names

#: table -> (subject column, personal columns): what ``Projection.personal`` declares.
Declared = Mapping[str, tuple[str, tuple[str, ...]]]


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


async def erase_declared(conn: db.Conn, declared: Declared, subject: str) -> None:
    """Set the declared personal columns of subject's rows to their erased values: one statement per table."""
    for table, (subject_column, columns) in declared.items():
        await conn.execute(erase_sql(table, subject_column, columns), subject)


def erase_sql(table: str, subject_column: str, columns: tuple[str, ...]) -> str:
    """The UPDATE erasing ``columns`` of ``table`` in the rows whose subject column (as text) is ``$1``.

    One statement whatever the columns' types, so a rebuild batches it like any handler's ``execute``: the
    catalog says which columns are ``NOT NULL`` (``substr(c, 1, 0)`` is the empty value of c's own type, text
    or bytea), the others get NULL. A text subject column's ``::text`` is no cast, so its index serves.
    """
    flags = ", ".join(f"bool_or(a.attnotnull) FILTER (WHERE a.attname = '{names.identifier(c)}') AS n{i}"
                      for i, c in enumerate(columns))
    sets = ", ".join(f"{names.quote(c)} = CASE WHEN n.n{i} THEN substr({names.quote(c)}, 1, 0) END"
                     for i, c in enumerate(columns))
    # Identifiers validated (lowercase letters, digits, underscores) and quoted; the subject is a parameter.
    return (f"UPDATE {names.quote(table)} SET {sets} FROM (SELECT {flags} FROM pg_attribute AS a "
            f"WHERE a.attrelid = '{names.quote(table)}'::regclass AND a.attnum > 0) AS n "
            f"WHERE {names.quote(subject_column)}::text = $1")


def residue_sql(schema: str, table: str, subject_column: str, columns: tuple[str, ...]) -> str:
    """A query of the subject ids (as text) of rows in ``schema.table`` that belong to a forgotten subject
    (a tombstone in ``schema.subject_keys``) and hold a non-empty value in a declared personal column."""
    qualified = f"{names.quote(schema, max_length=names.MAX_DERIVED_LENGTH)}.{names.quote(table)}"
    keys = f"{names.quote(schema, max_length=names.MAX_DERIVED_LENGTH)}.subject_keys"
    held = " OR ".join(f"({names.quote(c)} IS NOT NULL AND octet_length({names.quote(c)}) > 0)" for c in columns)
    subject = f"t.{names.quote(subject_column)}::text"
    return (f"SELECT {subject} AS subject FROM {qualified} AS t JOIN {keys} AS k ON k.subject = {subject} "
            f"WHERE k.wrapped_key IS NULL AND ({held})")

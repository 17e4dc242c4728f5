"""``eventfleet verify PROJECTION`` (and the demo's check): a projection's read model against a replay of the store.

The store is replayed into a scratch schema ``<schema>_vf_<projection>`` through the projection's handlers,
one event at a time (``workers.rebuild.replay``, the reference path: nothing of the live state is touched),
then each of its tables is compared with the live one as multisets of rows (``EXCEPT ALL`` both ways, on the
replay's columns by name). A row that differs in any column shows on both sides under its primary key. The
scratch schema is dropped afterwards, whatever happens.

A projection that declares personal columns (``Projection.personal``) is also checked for what a forget must
have erased: no row of a forgotten subject (a tombstone in ``subject_keys``) may hold a non-empty value in a
declared column (``Residue``). The replay alone shows it as a difference too (a forgotten subject's values
replay as erased); this names the subjects and holds whatever the replay does.

What it proves depends on what moved meanwhile: the replay reads the store as it is when it runs (in position
order, not waiting for the ``read_all`` horizon), and the read model is compared after it. Run it with the
writers and workers idle (lag 0): a row written in between shows as a difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from projections import erasure, registry
from projections.base import Projection
from store import db, names
from store.event_store import EventStore
from workers import errors, rebuild

#: Keys of differing rows reported per table and side by default.
LIMIT = 20

_COLUMNS = """
SELECT a.attname AS name,
       coalesce((SELECT k.n FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) WHERE k.attnum = a.attnum), 0)
           AS key_rank
FROM pg_attribute AS a
LEFT JOIN pg_index AS i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def _quote(identifier: str) -> str:
    return names.quote(identifier, max_length=names.MAX_DERIVED_LENGTH)


def _column(name: str) -> str:
    """A column name from the catalog, quoted (any name a table may have)."""
    return '"' + name.replace('"', '""') + '"'


def _json_value(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class TableDiff:
    """One table: rows on each side, how many rows only one side has, and the primary keys of (up to
    ``limit`` of) them, ordered. ``key`` is the primary key's columns, or every column when it has none."""

    table: str
    key: tuple[str, ...]
    rows: int  # in the read model
    replayed_rows: int  # in the replay
    only_in_read_model: int
    only_in_replay: int
    read_model_keys: tuple[tuple[Any, ...], ...]
    replay_keys: tuple[tuple[Any, ...], ...]

    @property
    def mismatched(self) -> int:
        """Rows of either side the other lacks (a changed row counts on both sides)."""
        return self.only_in_read_model + self.only_in_replay

    @property
    def truncated(self) -> bool:
        return len(self.read_model_keys) < self.only_in_read_model or len(self.replay_keys) < self.only_in_replay

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "key": list(self.key), "rows": self.rows, "replayed_rows": self.replayed_rows,
                "only_in_read_model": self.only_in_read_model, "only_in_replay": self.only_in_replay,
                "read_model_keys": [[_json_value(v) for v in k] for k in self.read_model_keys],
                "replay_keys": [[_json_value(v) for v in k] for k in self.replay_keys],
                "truncated": self.truncated}


@dataclasses.dataclass(frozen=True, slots=True)
class Residue:
    """A table with declared personal columns: its rows of forgotten subjects that still hold a value there,
    and (up to ``limit`` of) those subjects, ordered."""

    table: str
    subject_column: str
    columns: tuple[str, ...]
    rows: int
    subjects: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "subject_column": self.subject_column, "columns": list(self.columns),
                "rows": self.rows, "subjects": list(self.subjects)}


@dataclasses.dataclass(frozen=True, slots=True)
class Verification:
    """One projection: the events replayed, each of its tables compared, its declared personal columns checked."""

    projection: str
    events: int
    tables: tuple[TableDiff, ...]
    forgotten: tuple[Residue, ...] = ()

    @property
    def ok(self) -> bool:
        return all(t.mismatched == 0 for t in self.tables) and all(r.rows == 0 for r in self.forgotten)

    def to_json(self) -> dict[str, Any]:
        return {"projection": self.projection, "events": self.events, "ok": self.ok,
                "tables": [t.to_json() for t in self.tables], "forgotten": [r.to_json() for r in self.forgotten]}


async def verify(pool: db.Pool, store: EventStore, projection: type[Projection], *, limit: int = LIMIT,
                 settled: bool = True) -> Verification:
    """Replay the store into ``<schema>_vf_<name>`` and compare every table of the projection with it.

    ``limit``: keys reported per table and side (the counts are always complete). ``settled``: read the
    store in position order without waiting for the ``read_all`` horizon (see ``workers.rebuild.replay``).
    A reactor or a publication has no read model: ``ReactorNotRebuildable``.
    """
    if not projection.replayable:
        what = ("its effects are events in the store" if projection.kind == "reactor"
                else "its effects are messages to other services")
        raise errors.ReactorNotRebuildable(
            f"{projection.name} is a {projection.kind}: {what}, there is no read model to verify")
    scratch = rebuild.shadow_schema(store.schema, projection.name, kind="vf")
    try:
        events = await rebuild.replay(pool, store, projection, scratch, settled=settled)
        tables = [await _compare(pool, store.schema, scratch, table, limit) for table in projection.tables]
    finally:
        async with db.translate_errors():
            await pool.execute(f"DROP SCHEMA IF EXISTS {_quote(scratch)} CASCADE")
    residues = [await residue(pool, store.schema, table, subject_column, columns, limit)
                for table, (subject_column, columns) in projection.personal.items()]
    return Verification(projection.name, events, tuple(tables), tuple(residues))


async def residue(pool: db.Pool, schema: str, table: str, subject_column: str, columns: tuple[str, ...],
                  limit: int = LIMIT) -> Residue:
    """The rows of ``schema.table`` of forgotten subjects holding a value in a declared personal column."""
    found = erasure.residue_sql(schema, table, subject_column, columns)
    async with db.translate_errors():
        rows: int = await pool.fetchval(f"SELECT count(*) FROM ({found}) AS r")
        subjects = [r["subject"] for r in await pool.fetch(
            f"SELECT DISTINCT subject FROM ({found}) AS r ORDER BY subject LIMIT $1", limit)] if rows else []
    return Residue(table, subject_column, columns, rows, tuple(subjects))


async def verify_all(pool: db.Pool, store: EventStore, projections: Iterable[type[Projection]] | None = None, *,
                     limit: int = LIMIT, settled: bool = True) -> list[Verification]:
    """``verify`` for each projection (default: every registered one), reactors and publications
    left out."""
    found = registry.load().values() if projections is None else projections
    return [await verify(pool, store, cls, limit=limit, settled=settled)
            for cls in found if cls.replayable]


async def _compare(pool: db.Pool, schema: str, scratch: str, table: str, limit: int) -> TableDiff:
    live, replayed = f"{_quote(schema)}.{_quote(table)}", f"{_quote(scratch)}.{_quote(table)}"
    async with db.translate_errors():
        columns = await pool.fetch(_COLUMNS, replayed)
    names_ = [c["name"] for c in columns]
    ranked = sorted((c["key_rank"], c["name"]) for c in columns if c["key_rank"])
    key = tuple(name for _, name in ranked) or tuple(names_)
    select = ", ".join(map(_column, names_))
    keys = ", ".join(map(_column, key))
    only_live = f"SELECT {select} FROM {live} EXCEPT ALL SELECT {select} FROM {replayed}"
    only_replay = f"SELECT {select} FROM {replayed} EXCEPT ALL SELECT {select} FROM {live}"
    async with db.translate_errors():
        rows: int = await pool.fetchval(f"SELECT count(*) FROM {live}")
        replayed_rows: int = await pool.fetchval(f"SELECT count(*) FROM {replayed}")
        counts = [await pool.fetchval(f"SELECT count(*) FROM ({q}) AS d") for q in (only_live, only_replay)]
        samples = [await pool.fetch(f"SELECT {keys} FROM ({q}) AS d ORDER BY {keys} LIMIT $1", limit) if n else []
                   for q, n in ((only_live, counts[0]), (only_replay, counts[1]))]
    return TableDiff(table, key, rows, replayed_rows, counts[0], counts[1], _keys(samples[0]), _keys(samples[1]))


def _keys(records: Sequence[Any]) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(r.values()) for r in records)

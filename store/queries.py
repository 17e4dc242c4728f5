"""Loader of named SQL blocks (``-- name: x``) shipped as package data, and their binding to a schema."""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import LiteralString, cast

from store import names

_HEADER = re.compile(r"^-- name: (\w+)\n(?:--.*\n)*", re.MULTILINE)

#: Written before a table name (``{schema}.events``) in a statement that must not depend on the search_path.
SCHEMA = "{schema}"


def parse(text: str) -> dict[str, LiteralString]:
    """Split a queries file into {name: sql}; text before the first header is ignored."""
    parts = _HEADER.split(text)[1:]
    # The file ships with the package and is reviewed like code: as trusted as a literal.
    return {n: cast(LiteralString, q.strip()) for n, q in zip(parts[::2], parts[1::2], strict=True)}


def load(package: str, filename: str) -> dict[str, LiteralString]:
    """Parse the named-query file ``sql/<filename>`` of a package."""
    return parse((resources.files(package) / "sql" / filename).read_text("utf-8"))


# (id of the loaded file, schema) -> (that file, its bound queries). The entry holds the file, so its id
# cannot be reused while the entry exists. One entry per schema a process uses: a handful (the test suite,
# with a schema per test, one per test).
_BOUND: dict[tuple[int, str], tuple[Mapping[str, LiteralString], dict[str, LiteralString]]] = {}


def bind(queries: Mapping[str, LiteralString], schema: str) -> Mapping[str, LiteralString]:
    """The loaded ``queries`` with every ``{schema}`` marker replaced by ``schema``, validated and quoted.

    An identifier cannot be a bind parameter, so the schema is part of the text. The result is built once
    per file and schema and shared (do not mutate it): every store of a schema sends the very same
    strings, which asyncpg's prepared-statement cache is keyed on, and no call builds any.
    Raises ``InvalidName`` for an invalid schema.
    """
    key = (id(queries), schema)
    entry = _BOUND.get(key)
    if entry is None:
        quoted = names.quote(schema)  # validates: only [a-z_][a-z0-9_]*, then double-quoted
        # The file is as trusted as a literal and the identifier was validated and quoted: so is the result.
        # (mypy reads LiteralString as str and calls the cast redundant; checkers that enforce it need it.)
        bound = {n: cast(LiteralString, q.replace(SCHEMA, quoted))  # type: ignore[redundant-cast]
                 for n, q in queries.items()}
        entry = _BOUND[key] = (queries, bound)
    return entry[1]


#: The event store's statements, tables written ``{schema}.name``: ``bind`` them before use.
TEMPLATES = load("store", "queries.sql")

"""Loader of named SQL blocks (``-- name: x``) shipped as package data."""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

_HEADER = re.compile(r"^-- name: (\w+)\n(?:--.*\n)*", re.MULTILINE)


def parse(text: str) -> dict[str, LiteralString]:
    """Split a queries file into {name: sql}; text before the first header is ignored."""
    parts = _HEADER.split(text)[1:]
    # The file ships with the package and is reviewed like code: as trusted as a literal.
    return {n: cast(LiteralString, q.strip()) for n, q in zip(parts[::2], parts[1::2], strict=True)}


def load(package: str, filename: str) -> dict[str, LiteralString]:
    """Parse the named-query file ``sql/<filename>`` of a package."""
    return parse((resources.files(package) / "sql" / filename).read_text("utf-8"))


QUERIES = load("store", "queries.sql")

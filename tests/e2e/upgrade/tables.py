"""The read-model tables both releases share (a rolling upgrade changes handlers, not tables)."""

from __future__ import annotations

from typing import LiteralString

RATINGS_DDL: LiteralString = ("CREATE TABLE IF NOT EXISTS ratings (item text PRIMARY KEY, stars bigint NOT NULL, "
                              "ratings bigint NOT NULL, comments bigint NOT NULL)")
NOTES_DDL: LiteralString = "CREATE TABLE IF NOT EXISTS notes (item text PRIMARY KEY, notes bigint NOT NULL)"
RATE: LiteralString = ("INSERT INTO ratings AS r VALUES ($1, $2, 1, $3) ON CONFLICT (item) DO UPDATE SET "
                       "stars = r.stars + EXCLUDED.stars, ratings = r.ratings + 1, comments = r.comments + EXCLUDED.comments")
NOTE: LiteralString = "INSERT INTO notes AS n VALUES ($1, 1) ON CONFLICT (item) DO UPDATE SET notes = n.notes + 1"

"""Whether read models applied every stored event they handle (the fleets' tests wait for it)."""

from __future__ import annotations

from collections.abc import Sequence

import eventfleet.examples.orders.projections  # noqa: F401  (registers the example's read models: their types)
from projections import registry
from store import db

#: Per projection and stream, the last stored event of its types above its checkpoint: none left, all applied.
UNAPPLIED = """
SELECT count(*) FROM unnest($1::text[], $2::text[]) AS p(projection, names)
JOIN LATERAL (SELECT stream_id, max(version) AS v FROM events
              WHERE p.names IS NULL OR split_part(event_type, '.v', 1) = ANY(string_to_array(p.names, ','))
              GROUP BY stream_id) AS s ON true
LEFT JOIN checkpoints AS c ON c.projection = p.projection AND c.stream_id = s.stream_id
WHERE c.version IS NULL OR c.version < s.v
"""


def names_of(projection: str) -> str | None:
    """The event names a registered projection handles, comma-separated (None: every event, or unknown here)."""
    cls = registry.REGISTRY.get(projection)
    names = cls.handled_names() if isinstance(cls, type) else None
    return None if names is None else ",".join(sorted(names))


async def all_applied(pool: db.Pool, projections: Sequence[str]) -> bool:
    """Every stored event is applied by each projection: its checkpoints reach each stream's last event of the
    types it handles (a read model's checkpoint stops at its own last event: issue 25)."""
    missing: int = await pool.fetchval(UNAPPLIED, list(projections), [names_of(p) for p in projections])
    return missing == 0

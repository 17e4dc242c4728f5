"""Rebuilds: a projection refilled from the store into a shadow while live workers serve the old tables.

``shadow``: the shadow's life (create, fill, make durable, swap). ``applier``: handlers applied in deferred
batches with failures isolated. ``reader``: the store read ahead. ``backfill``: new projections go live.
"""

from __future__ import annotations

from workers.rebuild.shadow import (
    BATCH_SIZE,
    Progress,
    Rebuild,
    RebuildResult,
    rebuild,
    replay,
    shadow_schema,
)

__all__ = ["BATCH_SIZE", "Progress", "Rebuild", "RebuildResult", "rebuild", "replay", "shadow_schema"]

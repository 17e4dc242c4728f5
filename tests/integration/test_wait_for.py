"""projections.wait_for: read-after-write on a projection's checkpoint."""

from __future__ import annotations

import asyncio

import pytest

import projections

SET_CHECKPOINT = """
INSERT INTO checkpoints AS c (projection, stream_id, version) VALUES ($1, $2, $3)
ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version
"""


async def test_returns_once_the_version_is_applied(pool):
    waiting = asyncio.create_task(projections.wait_for(pool, "order_summary", "order-1", 2, timeout=30))
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-1", 1)
    await pool.execute(SET_CHECKPOINT, "customer_stats", "order-1", 5)  # another projection: not enough
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done, "returned before version 2 was applied"
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-1", 3)
    assert await waiting == 3


async def test_returns_at_once_when_already_applied(pool):
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-9", 4)
    assert await projections.wait_for(pool, "order_summary", "order-9", 4, timeout=0) == 4


async def test_raises_wait_timeout_naming_how_far_it_got(pool):
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-2", 0)
    with pytest.raises(projections.WaitTimeout, match="up to version 0, not 1") as info:
        await projections.wait_for(pool, "order_summary", "order-2", 1, timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(projections.WaitTimeout, match="up to version -1"):
        await projections.wait_for(pool, "order_summary", "order-unknown", 0, timeout=0.05)

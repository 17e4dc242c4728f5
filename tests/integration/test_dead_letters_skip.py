"""``eventfleet dead-letters skip ID``: a halted stream moves past its parked event for good, recorded."""

from __future__ import annotations

import asyncio
import logging

import pytest
import tenacity

from projections import registry
from store import NO_STREAM
from tests.integration.test_dead_letters import Probe, SkippingProbe, checkpoint, seen
from tests.unit.test_projection_fold import cancelled, paid, placed
from workers import locks
from workers.errors import HandlerFailed, NotRetryable
from workers.projector import lag, parking


@pytest.fixture
def registered(monkeypatch):
    """Probe known by name, as a deployment's registry would have it (the command line resolves it so)."""
    monkeypatch.setitem(registry.REGISTRY, Probe.name, Probe)


async def halt(pool, event_store, *later) -> int:
    """order-a: placed, cancelled 'boom' (parked by Probe, which stays broken: the stream halts there), then
    ``later`` (held behind it); every event delivered in one batch. The dead letter's id."""
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom"), *later], NO_STREAM)
    result = await parking.apply_or_park(event_store, Probe(), await event_store.load("order-a"),
                                         wait=tenacity.wait_none())
    (parked,) = result.parked
    assert await checkpoint(pool, Probe.name, "order-a") == (0, 1)
    return parked.dead_letter_id


async def dead_letter_state(pool, dead_id: int) -> tuple[str, bool, int]:
    row = await pool.fetchrow("SELECT status, resolved_at IS NOT NULL, attempts FROM dead_letters WHERE id = $1",
                              dead_id)
    return row[0], row[1], row[2]


async def test_skip_moves_the_stream_past_the_event_and_applies_the_held_ones(pool, event_store, schema, prefix,
                                                                              run_cli, registered):
    dead_id = await halt(pool, event_store, paid("a", "c"), paid("a", "c", "1.00"))
    applied_before = await pool.fetchval("SELECT applied FROM projection_status WHERE projection = $1", Probe.name)

    ran = await run_cli("dead-letters", "skip", str(dead_id), schema=schema, prefix=prefix)

    assert (ran.code, ran.err) == (0, "")
    assert ran.out == (f"dead letter {dead_id}: skipped order-a@1 of poison_probe without applying it; "
                       "applied 2 later events (now at version 3); stream released\n")
    assert await seen(pool, Probe.name) == [("order-a", 0), ("order-a", 2), ("order-a", 3)]
    assert await checkpoint(pool, Probe.name, "order-a") == (3, None)
    assert await dead_letter_state(pool, dead_id) == ("skipped", True, parking.ATTEMPTS)
    assert await pool.fetchval("SELECT applied FROM projection_status WHERE projection = $1",
                               Probe.name) == applied_before + 2
    assert (await lag.measure(pool, Probe.name)).lag_events == 0


async def test_skip_of_the_last_event_of_a_stream_leaves_its_checkpoint_at_it(pool, event_store):
    dead_id = await halt(pool, event_store)

    done = await parking.skip(event_store, dead_id, resolve=lambda _: Probe())

    assert done == parking.Skipped(dead_id, Probe.name, "order-a", 1, 0, 1)
    assert await checkpoint(pool, Probe.name, "order-a") == (1, None)
    assert (await lag.measure(pool, Probe.name)).lag_events == 0


async def test_skip_logs_what_it_did(pool, event_store, caplog):
    dead_id = await halt(pool, event_store, paid("a", "c"))

    with caplog.at_level(logging.INFO, logger="workers.projector.parking"):
        await parking.skip(event_store, dead_id, resolve=lambda _: Probe())

    (record,) = [r for r in caplog.records if r.getMessage() == "dead letter skipped"]
    assert (record.dead_letter, record.projection, record.stream_id, record.version, record.applied) == (
        dead_id, Probe.name, "order-a", 1, 1)


async def test_skip_of_an_undecodable_message_only_marks_it_skipped(pool, schema, prefix, run_cli):
    (dead_id,) = await parking.record_undecodable(pool, Probe.name, [("MalformedMessage: not msgpack", b"\xc1")])

    ran = await run_cli("dead-letters", "skip", str(dead_id), schema=schema, prefix=prefix)

    assert (ran.code, ran.err) == (0, "")
    assert ran.out == (f"dead letter {dead_id}: undecodable message of poison_probe marked skipped "
                       "(it halted no stream)\n")
    assert await dead_letter_state(pool, dead_id) == ("skipped", True, 1)
    assert await pool.fetchval("SELECT count(*) FROM checkpoints") == 0


async def test_skip_refuses_a_dead_letter_that_is_not_parked(pool, event_store, schema, prefix, run_cli):
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom")], NO_STREAM)
    # The "skip" policy already moved the stream on and recorded the dead letter as skipped.
    result = await parking.apply_or_park(event_store, SkippingProbe(), await event_store.load("order-a"),
                                         wait=tenacity.wait_none())
    dead_id = result.parked[0].dead_letter_id

    ran = await run_cli("dead-letters", "skip", str(dead_id), schema=schema, prefix=prefix)

    assert (ran.code, ran.out) == (1, "")
    assert ran.err == f"eventfleet dead-letters: dead letter {dead_id} is skipped; only parked ones can be skipped\n"


async def test_skip_of_an_unknown_id_exits_1_with_a_one_line_reason(schema, prefix, run_cli):
    ran = await run_cli("dead-letters", "skip", "424242", schema=schema, prefix=prefix)

    assert (ran.code, ran.out, ran.err) == (1, "", "eventfleet dead-letters: no dead letter 424242\n")


async def test_skip_changes_nothing_when_a_later_event_fails_too(pool, event_store):
    dead_id = await halt(pool, event_store, cancelled("a", "c", "boom"))

    with pytest.raises(HandlerFailed, match="order-a@2"):
        await parking.skip(event_store, dead_id, resolve=lambda _: Probe())

    assert await checkpoint(pool, Probe.name, "order-a") == (0, 1)
    assert await dead_letter_state(pool, dead_id) == ("parked", False, parking.ATTEMPTS)
    assert await seen(pool, Probe.name) == [("order-a", 0)]


async def test_skip_refuses_to_pass_the_earlier_event_its_stream_is_halted_at(pool, event_store):
    await halt(pool, event_store, paid("a", "c"))
    stray = await pool.fetchval("INSERT INTO dead_letters (projection, stream_id, version, error) "
                                "VALUES ($1, 'order-a', 2, 'boom') RETURNING id", Probe.name)

    with pytest.raises(NotRetryable, match="halted at version 1, before 2"):
        await parking.skip(event_store, stray, resolve=lambda _: Probe())

    assert await checkpoint(pool, Probe.name, "order-a") == (0, 1)
    assert await dead_letter_state(pool, stray) == ("parked", False, 1)


@pytest.mark.parametrize("lock", [locks.projection, locks.watermark])
async def test_skip_waits_for_the_locks_a_redrive_takes(pool, event_store, schema, lock):
    """A rebuild's swap holds the projection lock exclusively, the lag monitor the watermark lock."""
    dead_id = await halt(pool, event_store, paid("a", "c"))
    key = lock(schema, Probe.name)
    async with pool.acquire() as holder, holder.transaction():
        await locks.take(holder, key)
        skipping = asyncio.create_task(parking.skip(event_store, dead_id, resolve=lambda _: Probe()))
        await waiting_for(pool, key)
        assert not skipping.done()
        assert await checkpoint(pool, Probe.name, "order-a") == (0, 1)
    done = await asyncio.wait_for(skipping, 10)
    assert (done.applied, done.version) == (1, 2)


async def waiting_for(pool, key: str) -> None:
    """Return once some session waits for the advisory lock ``key`` (fail after 10 s)."""
    waiting = locks.SQL["held"].replace("AND granted", "AND NOT granted")
    for _ in range(500):
        if await pool.fetchval(waiting, key):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"nobody waits for {key}")

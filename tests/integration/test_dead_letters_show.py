"""``eventfleet dead-letters show ID``: one dead letter in full, its whole traceback included."""

from __future__ import annotations

import tenacity

from store import NO_STREAM
from tests.integration.test_dead_letters import Probe
from tests.unit.test_projection_fold import cancelled, placed
from workers.projector import parking


async def park_poison(pool, event_store) -> int:
    """order-a@1 (a cancellation with reason 'boom') parked by Probe after its tries; its dead letter's id."""
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom")], NO_STREAM)
    result = await parking.apply_or_park(event_store, Probe(), await event_store.load("order-a"),
                                         wait=tenacity.wait_none())
    (parked,) = result.parked
    return parked.dead_letter_id


async def test_show_prints_every_field_and_the_whole_traceback(pool, event_store, schema, prefix, run_cli):
    dead_id = await park_poison(pool, event_store)
    (_, poison) = await event_store.load("order-a")
    stored = await pool.fetchrow("SELECT created_at, traceback FROM dead_letters WHERE id = $1", dead_id)
    assert len(stored["traceback"].splitlines()) > 3, "a real traceback, several frames long"

    ran = await run_cli("dead-letters", "show", str(dead_id), schema=schema, prefix=prefix)

    assert (ran.code, ran.err) == (0, "")
    assert ran.out.splitlines() == [
        f"dead letter {dead_id}",
        "  projection:      poison_probe",
        "  stream@version:  order-a@1",
        "  event type:      OrderCancelled.v1",
        f"  event id:        {poison.event_id}",
        f"  global position: {poison.global_position}",
        "  status:          parked",
        f"  attempts:        {parking.ATTEMPTS}",
        f"  created at:      {stored['created_at']:%Y-%m-%d %H:%M:%S%z}",
        "  resolved at:     -",
        "error:",
        "  ValueError: boom at order-a@1",
        "traceback:",
        *(f"  {line}" for line in stored["traceback"].splitlines()),
    ]


async def test_show_prints_a_resolved_dead_letter_with_its_resolution_time(pool, event_store, schema, prefix,
                                                                           run_cli):
    dead_id = await park_poison(pool, event_store)
    resolved = await pool.fetchval("UPDATE dead_letters SET status = 'retried', resolved_at = clock_timestamp() "
                                   "WHERE id = $1 RETURNING resolved_at", dead_id)

    ran = await run_cli("dead-letters", "show", str(dead_id), schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    assert "  status:          retried" in ran.out.splitlines()
    assert f"  resolved at:     {resolved:%Y-%m-%d %H:%M:%S%z}" in ran.out.splitlines()


async def test_show_of_an_undecodable_message_says_so_and_keeps_its_size(pool, schema, prefix, run_cli):
    (dead_id,) = await parking.record_undecodable(pool, "poison_probe", [("MalformedMessage: not msgpack",
                                                                            b"\xc1\xc1\xc1")])

    ran = await run_cli("dead-letters", "show", str(dead_id), schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert lines[2:5] == ["  stream@version:  (undecodable message)", "  event type:      -", "  event id:        -"]
    assert "  raw message:     3 bytes kept" in lines
    assert lines[-3:] == ["error:", "  MalformedMessage: not msgpack", "traceback:"]  # none was stored


async def test_show_of_an_unknown_id_exits_1_with_a_one_line_reason(schema, prefix, run_cli):
    ran = await run_cli("dead-letters", "show", "424242", schema=schema, prefix=prefix)

    assert (ran.code, ran.out, ran.err) == (1, "", "eventfleet dead-letters: no dead letter 424242\n")

"""``eventfleet dead-letters``: list, show, re-drive and skip parked failures."""

from __future__ import annotations

import argparse
from typing import Any

from projections import registry
from projections.base import Projection
from workers.config import Settings
from workers.projector.parking import DeadLetter, Redriven, Skipped, dead_letter, list_parked, retry, skip
from workers.publication.outlet import Runtime
from workers.runtime import lifecycle


def _line(row: dict[str, Any]) -> str:
    where = "(undecodable message)" if row["undecodable"] else f"{row['stream_id']}@{row['version']}"
    error = (row["error"] or "").splitlines()[0][:120] if row["error"] else ""
    return (f"{row['id']:>6}  {row['projection']:<20} {where:<32} {row['event_type'] or '-':<22} "
            f"{row['attempts']:>3}  {row['created_at']:%Y-%m-%d %H:%M:%S}  {error}")


def render(letter: DeadLetter) -> str:
    """Every field of a dead letter, then its whole error and traceback."""
    where = "(undecodable message)" if letter.stream_id is None else f"{letter.stream_id}@{letter.version}"
    fields = [
        ("projection", letter.projection),
        ("stream@version", where),
        ("event type", letter.event_type or "-"),
        ("event id", "-" if letter.event_id is None else str(letter.event_id)),
        ("global position", "-" if letter.global_position is None else str(letter.global_position)),
        ("status", letter.status),
        ("attempts", str(letter.attempts)),
        ("created at", f"{letter.created_at:%Y-%m-%d %H:%M:%S%z}"),
        ("resolved at", "-" if letter.resolved_at is None else f"{letter.resolved_at:%Y-%m-%d %H:%M:%S%z}"),
    ]
    if letter.body_bytes is not None:
        fields.append(("raw message", f"{letter.body_bytes:,} bytes kept"))
    lines = [f"dead letter {letter.id}"]
    lines += [f"  {label + ':':<17}{value}" for label, value in fields]
    lines += ["error:", *(f"  {line}" for line in letter.error.splitlines())]
    lines += ["traceback:", *(f"  {line}" for line in letter.traceback.splitlines())]
    return "\n".join(lines)


def skipped_line(done: Skipped) -> str:
    """What a skip did, in one line."""
    if done.stream_id is None:
        return (f"dead letter {done.dead_letter_id}: undecodable message of {done.projection} marked skipped "
                "(it halted no stream)")
    return (f"dead letter {done.dead_letter_id}: skipped {done.stream_id}@{done.skipped_version} of "
            f"{done.projection} without applying it; applied {done.applied} later events "
            f"(now at version {done.version}); stream released")


def retried_line(done: Redriven) -> str:
    """What a retry did, in one line."""
    if done.stream_id is None:
        held = f"; {len(done.held)} halted by another dead letter left to it" if done.held else ""
        return (f"dead letter {done.dead_letter_id}: batch message re-driven: applied {done.applied} events of "
                f"{len(done.streams)} streams to {done.projection}; streams released{held}")
    return (f"dead letter {done.dead_letter_id}: applied {done.applied} events of {done.stream_id} "
            f"to {done.projection} (now at version {done.version}); stream released")


async def cmd_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet dead-letters list [--projection NAME]`` / ``show ID`` / ``retry ID`` / ``skip ID``."""
    async with lifecycle.open_pool(settings, min_size=1, max_size=2) as pool:
        if args.action == "show":
            print(render(await dead_letter(pool, args.id)))
            return 0
        if args.action == "list":
            rows = await list_parked(pool, args.projection)
            print(f"{'id':>6}  {'projection':<20} {'stream@version':<32} {'type':<22} {'try':>3}  "
                  f"{'parked at':<19}  error")
            for row in rows:
                print(_line(row))
            print(f"{len(rows)} parked")
            return 0
        store = lifecycle.open_store(pool, settings)
        made: list[Projection] = []  # detached at the end (a publication's outlet is closed)

        def resolve(name: str) -> Projection:
            made.append(registry.get(name)())
            return made[-1]

        try:
            if args.action == "skip":
                print(skipped_line(await skip(store, args.id, resolve, runtime=Runtime(settings))))
                return 0
            print(retried_line(await retry(store, args.id, resolve, runtime=Runtime(settings))))
            return 0
        finally:
            for projection in made:
                await projection.detach()

"""``eventfleet status [--json]``: per projection state, lag and parked failures; reactors' deadlines and refusals;
the outbox backlog."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from aio_pika.abc import AbstractConnection

from workers.admin.status import AMQP_TIMEOUT, ReactorStatus, Report, collect
from workers.config import Settings
from workers.errors import BrokerUnavailable
from workers.rebuild import typebook
from workers.runtime import amqp, lifecycle, redact, retry

#: Partitions ``status`` lists without ``--partitions``: the slowest.
SLOWEST = 5


def _table(lines: Sequence[tuple[str, ...]], left: int) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths, strict=True))) for line in lines]


def _due(reactor: ReactorStatus) -> str:
    seconds = reactor.next_due_seconds
    if seconds is None:
        return "-"
    return f"in {seconds:.1f}s" if seconds >= 0 else f"{-seconds:.1f}s overdue"


def render(report: Report, *, all_partitions: bool = False) -> str:
    """The report as aligned tables: projections, workers and their partitions, the slowest partitions."""
    # GROUP (shown once a worker group feeds a projection): the groups whose queues QUEUE counts.
    grouped = any(p.queue_groups for p in report.projections)
    header: tuple[str, ...] = ("PROJECTION", "STATE", "APPLIED", "LAG EVENTS", "LAG SECONDS", "PARKED",
                               "HALTED STREAMS", "QUEUE", *(("GROUP",) if grouped else ()))
    lines = [header]
    for p in report.projections:
        state = p.state if p.state == "live" or p.rebuild_running else f"{p.state} (not running)"
        lines.append((p.name, state, f"{p.applied:,}", f"{p.lag_events:,}", f"{p.lag_seconds:.1f}",
                      f"{p.parked:,}", f"{p.halted:,}", "-" if p.queue_depth is None else f"{p.queue_depth:,}",
                      *(("+".join(p.queue_groups) or "-",) if grouped else ())))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths,
                                                                                               strict=True)))
            for line in lines]
    text.append(f"outbox: {report.outbox_pending:,} pending, oldest {report.outbox_oldest_age_seconds:.1f}s")
    if report.reactors:
        reactors: list[tuple[str, ...]] = [("REACTOR", "DEADLINES PENDING", "NEXT DUE", "FIRED", "REFUSALS")]
        reactors += [(r.name, f"{r.deadlines_pending:,}", _due(r), f"{r.deadlines_fired:,}", f"{r.refusals:,}")
                     for r in report.reactors]
        text += ["", *_table(reactors, 1)]
    if report.publications:
        publications: list[tuple[str, ...]] = [("PUBLICATION", "EXCHANGE", "FORMAT")]
        publications += [(p.name, p.exchange, p.format) for p in report.publications]
        text += ["", *_table(publications, 3)]
    text.append(f"broker: {report.broker.describe()}")
    if report.broker.warning is not None:
        text.append(f"warning: {report.broker.warning}")
    unsure = [p for p in report.projections if len(p.queue_groups) > 1]
    if unsure:
        summed = sorted({g for p in unsure for g in p.queue_groups})
        text.append(f"queue: {', '.join(p.name for p in unsure)}: no registered worker tells which worker group "
                    f"runs {'it' if len(unsure) == 1 else 'them'}: QUEUE is the sum of the queues of groups "
                    f"{', '.join(summed)}")
    text += _types(report)
    # A worker group's partitions are leased under its own name (group:<name>): a column of their own.
    projections = [p.name for p in report.projections]
    projections += sorted({lease for w in report.workers for lease in w.held} - set(projections))
    text.append("")
    if report.workers:
        workers: list[tuple[str, ...]] = [("WORKER", "HEARTBEAT", *(p.upper() for p in projections))]
        workers += [(w.worker_id, f"{w.heartbeat_age_seconds:.1f}s ago" if w.live else "expired",
                     *(str(w.held.get(p, 0)) for p in projections)) for w in report.workers]
        text += [f"workers: {sum(w.live for w in report.workers)} live, {report.partitions} partitions per projection",
                 *_table(workers, 2)]
    else:
        text.append(f"workers: none registered, {report.partitions} partitions per projection")
    shown = report.partition_lags if all_partitions else report.partition_lags[:SLOWEST]
    if shown:
        title = "partitions:" if all_partitions else "slowest partitions (--partitions for all):"
        slow: list[tuple[str, ...]] = [("PROJECTION", "PARTITION", "OWNER", "LAG EVENTS")]
        slow += [(p.projection, str(p.partition), p.owner or "-", f"{p.lag_events:,}") for p in shown]
        text += ["", title, *_table(slow, 3)]
    held = [p for p in report.partition_lags if p.held]
    if held:
        text += ["", "held for a worker of a newer release (a rolling upgrade: nothing parked, nothing to do):"]
        text += [f"  {p.projection} partition {p.partition}: {p.held}" for p in held]
    return "\n".join(text)


def _types(report: Report) -> list[str]:
    """Each read model's handled types; the changes waiting for a rebuild; the read models no code runs."""
    text = ["types: " + "; ".join(f"{p.name} {typebook.describe(p.handled)}" for p in report.projections)]
    for p in report.projections:
        if p.types_pending:
            added = "every event" if p.types_added is None else typebook.describe(p.types_added)
            text.append(f"types pending: {p.name} handles {added} in newer code: its workers rebuild it from the "
                        f"store once no worker of other code runs it (or: eventfleet rebuild {p.name})")
        if not p.in_code:
            text.append(f"not in the code: {p.name}: no worker runs it, yet its queues still fill on the broker; "
                        f"eventfleet retire {p.name} removes its queues and bookkeeping (--drop-tables: its tables)")
    return text


async def _connect_amqp(settings: Settings) -> AbstractConnection | None:
    try:
        return await amqp.connect(settings.amqp_urls, name="eventfleet status", attempt_seconds=AMQP_TIMEOUT)
    except retry.OUTAGE_ERRORS as exc:
        # BrokerUnavailable says why (a node that took TCP and never answered, or refused the login); others by
        # their type alone, as their text may hold a URL.
        why = f"{exc}" if isinstance(exc, BrokerUnavailable) else type(exc).__name__
        print(redact.text(f"eventfleet status: {why} (queue depths unknown)"), file=sys.stderr)
        return None


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet status [--json]``."""
    connection = await _connect_amqp(settings)
    try:  # a schema not migrated: cli.main says so (SchemaNotMigrated)
        async with lifecycle.open_pool(settings, min_size=1, max_size=2) as pool:
            report = await collect(pool, settings.schema, settings.prefix, connection,
                                   lease_seconds=settings.lease_seconds, group=settings.group)
    finally:
        if connection is not None:
            await connection.close()
    print(json.dumps(report.to_json()) if args.json else render(report, all_partitions=args.partitions))
    return 0

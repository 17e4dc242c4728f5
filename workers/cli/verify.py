"""``eventfleet verify PROJECTION [--json] [--limit N]``: the read model against a replay of the store.

Exit 0 when every table of the projection equals the replay, 1 when any row differs (or on an error). A
deployment whose quorum queues need more than half of a default RabbitMQ node's file handles is warned
about on stderr (``BrokerNeeds``), as ``status`` does."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg

from projections import registry
from store import errors
from workers.admin.status import BrokerNeeds, known_groups, projection_names, schema_partitions
from workers.admin.verify import TableDiff, Verification, verify
from workers.config import Settings
from workers.runtime import lifecycle


def _key(values: Sequence[Any]) -> str:
    return ", ".join("NULL" if v is None else str(v) for v in values)


def _side(label: str, table: TableDiff, count: int, keys: Sequence[Sequence[Any]]) -> list[str]:
    if not count:
        return []
    shown = "; ".join(f"({_key(k)})" if len(table.key) > 1 else _key(k) for k in keys)
    more = f" ... and {count - len(keys):,} more" if count > len(keys) else ""
    return [f"    {count:,} only in the {label} ({', '.join(table.key)}): {shown}{more}"]


def render(result: Verification) -> str:
    """Per table: rows on each side, then the keys of the rows only one side has; the verdict last."""
    lines = [f"{result.projection}: read model against a replay of {result.events:,} events"]
    width = max((len(t.table) for t in result.tables), default=0)
    for t in result.tables:
        if t.mismatched == 0:
            lines.append(f"  {t.table:<{width}}  {t.rows:>8,} rows  match")
            continue
        lines.append(f"  {t.table:<{width}}  {t.rows:>8,} rows  {t.replayed_rows:,} in the replay: "
                     f"{t.mismatched:,} rows differ")
        lines += _side("read model", t, t.only_in_read_model, t.read_model_keys)
        lines += _side("replay", t, t.only_in_replay, t.replay_keys)
    for r in result.forgotten:
        if r.rows == 0:
            lines.append(f"  {r.table}: personal columns of forgotten subjects erased")
            continue
        lines.append(f"  {r.table}: {r.rows:,} row{'' if r.rows == 1 else 's'} of forgotten subjects hold personal values "
                     f"({', '.join(r.columns)}): subjects {', '.join(r.subjects)}")
    lines.append("result: OK" if result.ok else "result: MISMATCH")
    return "\n".join(lines)


async def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet verify PROJECTION [--json] [--limit N]``."""
    if args.limit < 0:
        raise errors.InvalidInput("--limit must be 0 or more")
    projection = registry.get(args.projection)
    try:
        async with lifecycle.open_pool(settings, min_size=1, max_size=3) as pool:
            result = await verify(pool, lifecycle.open_store(pool, settings), projection, limit=args.limit)
            # Without a broker connection: the worker groups its Postgres knows (leased, or this process's), and
            # the read models their registered workers run (no partition queues of their own).
            leased, group_of = await known_groups(pool)
            groups = {*leased, *(() if settings.group is None else (settings.group,))}
            needs = BrokerNeeds(len(await projection_names(pool)), await schema_partitions(pool), len(groups),
                                len(group_of))
    except errors.StoreError as exc:
        if isinstance(exc.__cause__, asyncpg.UndefinedTableError):
            raise errors.StoreError(f"schema {settings.schema!r} is not migrated: run `eventfleet migrate`") from exc
        raise
    print(json.dumps(result.to_json()) if args.json else render(result))
    if needs.warning is not None:  # the broker's part of the deployment: on stderr, the result stays as it was
        print(f"eventfleet verify: warning: {needs.describe()}: {needs.warning}", file=sys.stderr)
    return 0 if result.ok else 1

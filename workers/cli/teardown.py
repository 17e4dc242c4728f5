"""``eventfleet teardown --yes``: drop a deployment's schemas, queues, exchanges and roles."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from workers import errors
from workers.admin.status import AMQP_TIMEOUT
from workers.admin.teardown import Plan, plan, tear_down
from workers.config import Settings
from workers.runtime import amqp, retry


def describe(found: Plan) -> list[tuple[str, Sequence[str]]]:
    """The plan as (kind, names) pairs in the order they are dropped, kinds with nothing left out."""
    kinds = [("queues", found.queues), ("exchanges", found.exchanges), ("schema", (found.schema,)),
             ("shadow schemas", found.shadows), ("roles", found.roles)]
    return [(kind, items) for kind, items in kinds if items]


async def cmd_teardown(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet teardown [--yes [--force]]``: without ``--yes``, name what would be dropped and exit 2; while
    relays or workers use the deployment, refuse unless ``--force``."""
    try:
        connection = await amqp.connect(settings.amqp_urls, name="eventfleet teardown", attempt_seconds=AMQP_TIMEOUT)
    except retry.OUTAGE_ERRORS as exc:
        # BrokerUnavailable says why (a node that took TCP and never answered: out of file descriptors, which
        # deleting queues would cure: rabbitmqctl delete_queue works without AMQP); others by their type alone.
        why = f"{exc}" if isinstance(exc, errors.BrokerUnavailable) else type(exc).__name__
        raise errors.BrokerUnavailable(f"{why}; nothing dropped") from exc
    async with connection:
        found = await plan(settings.database_url, settings.schema, settings.prefix, connection,
                           groups=() if settings.group is None else (settings.group,))
        if not args.yes:
            print(f"eventfleet teardown: refusing without --yes; it would drop, for schema {settings.schema} "
                  f"and prefix {settings.prefix}:", file=sys.stderr)
            for kind, items in describe(found):
                print(f"  {kind}: {', '.join(items)}", file=sys.stderr)
            if found.in_use is not None:
                print(f"  in use now: {found.in_use}", file=sys.stderr)
            print("stop the relay and workers first; roles are cluster-wide", file=sys.stderr)
            return 2
        done = await tear_down(settings.database_url, found, connection, force=args.force)
    for kind, items in describe(found):
        if kind == "roles":
            items = done.dropped_roles
        if items:
            print(f"dropped {kind}: {', '.join(items)}")
    for role in done.kept_roles:
        print(f"kept role {role}: it is still granted privileges outside this deployment (roles are cluster-wide)")
    return 0

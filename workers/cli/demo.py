"""``eventfleet demo``: the main job end to end on one machine, in under a minute.

Checks that PostgreSQL and RabbitMQ answer (saying which one does not and how to start it), then runs the
orders example's demo (``eventfleet/examples/orders/demo.py``) on a deployment of its own,
``eventfleet_demo_<random>`` (the same name as RabbitMQ prefix), through ``workers.fleet``: one relay and three
workers as subprocesses, the writer load with progress and lag, lag 0, every read-model row compared with a
replay of the store, a summary; the deployment is torn down whatever happens. Exit 0 only if every row matched.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import aio_pika
import asyncpg

from projections import registry
from workers import errors
from workers.config import Settings
from workers.runtime import redact, retry

#: The example's demo, imported when the command runs: the runtime does not import the example.
DEMO = "eventfleet.examples.orders.demo"
#: The worker group the demo's workers run in, unless EVENTFLEET_GROUP names one.
DEMO_GROUP = "demo"
CONNECT_TIMEOUT = 5.0


async def preflight(settings: Settings) -> None:
    """Raise errors.DemoFailed naming the service that does not answer and how to start it."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT)
        await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise errors.DemoFailed(
            f"PostgreSQL is not reachable at {redact.url(settings.database_url)} ({type(exc).__name__}: {exc}).\n"
            "  Start it, e.g. `pg_ctlcluster 15 main start`, or `docker run -d -p 5432:5432 "
            "-e POSTGRES_HOST_AUTH_METHOD=trust postgres:15`; or point EVENTFLEET_DATABASE_URL at it.") from exc
    quiet = logging.getLogger("aiormq.connection")
    level, quiet.level = quiet.level, logging.CRITICAL  # it logs the refused connection we report below
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=CONNECT_TIMEOUT)
        await connection.close()
    except retry.OUTAGE_ERRORS as exc:
        raise errors.DemoFailed(
            f"RabbitMQ is not reachable at {redact.url(settings.amqp_url)} ({type(exc).__name__}: {exc}).\n"
            "  Start it, e.g. `rabbitmq-server -detached`, or `docker run -d -p 5672:5672 rabbitmq:3`; "
            "or point EVENTFLEET_AMQP_URL at it.") from exc
    finally:
        quiet.setLevel(level)


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet demo [--orders N]``."""
    demo = importlib.import_module(DEMO)
    name = f"eventfleet_demo_{uuid.uuid4().hex[:8]}"
    # The demo runs the orders example: it names its modules itself (and whatever else is configured), and its
    # workers in one worker group (docs/reference.md 6.0), EVENTFLEET_GROUP's if set.
    settings = dataclasses.replace(settings, schema=name, prefix=name, group=settings.group or DEMO_GROUP
                                   ).with_projection_modules(*demo.MODULES)
    registry.load(settings.projection_modules)
    try:
        await preflight(settings)
    except errors.DemoFailed as exc:
        print(f"eventfleet demo: {exc}", file=sys.stderr)
        return 1
    logs = Path(tempfile.mkdtemp(prefix="eventfleet-demo-"))
    # The demo says it cleans up; teardown's list of every queue it deleted would drown its summary.
    logging.getLogger("workers.admin.teardown").setLevel(logging.WARNING)
    ok = False
    try:
        ok = await demo.run_demo(settings, args.orders, logs)
    except (errors.DemoFailed, errors.FleetFailed) as exc:
        print(f"eventfleet demo: {exc}", file=sys.stderr)
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"eventfleet demo: failed; the processes' logs are in {logs}", file=sys.stderr)
    return 0 if ok else 1

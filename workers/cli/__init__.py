"""``eventfleet``: argparse subcommands, one coroutine each, exit codes rather than tracebacks."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import asyncpg

from projections import registry
from store import errors
from workers.config import ENVIRONMENT, Settings
from workers.runtime import logs, redact, tuning

logger = logging.getLogger(__name__)

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

# subcommand -> "module:function"; imported on use so each command loads only what it needs.
_COMMANDS = {
    "migrate": "workers.cli.migrate:cmd_migrate",
    "relay": "workers.cli.relay:cmd_relay",
    "worker": "workers.cli.worker:cmd_worker",
    "status": "workers.cli.status:cmd_status",
    "rebuild": "workers.cli.rebuild:cmd_rebuild",
    "load": "workers.cli.load:cmd_load",
    "demo": "workers.cli.demo:cmd_demo",
    "dead-letters": "workers.cli.dead_letters:cmd_dead_letters",
    "teardown": "workers.cli.teardown:cmd_teardown",
    "retire": "workers.cli.retire:cmd_retire",
    "verify": "workers.cli.verify:cmd_verify",
    "forget": "workers.cli.forget:cmd_forget",
    "rewrap-keys": "workers.cli.forget:cmd_rewrap_keys",
    "close-stream": "workers.cli.archive:cmd_close_stream",
    "archive": "workers.cli.archive:cmd_archive",
    "republish": "workers.cli.republish:cmd_republish",
}


def _environment_help() -> str:
    width = max(len(name) for name, _, _ in ENVIRONMENT)
    lines = [f"  {name:<{width}}  {meaning} (default: {default})" for name, default, meaning in ENVIRONMENT]
    return "environment variables (read once at start):\n" + "\n".join(lines) + (
        f"\n\nprojections come from {registry.SOURCES}; the orders example is {registry.EXAMPLE}.")


def _with_modules(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The option of every command that needs the projection registry."""
    parser.add_argument("--projection-module", action="append", default=[], metavar="M", dest="projection_module",
                        help="import module M for its projections (repeatable; adds to EVENTFLEET_PROJECTION_MODULES)")
    parser.add_argument("--app-dir", default=".", metavar="DIR",
                        help="import the projection modules from DIR first (default: the current directory)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="eventfleet",
        description="Event sourcing on PostgreSQL and RabbitMQ. Configured by EVENTFLEET_* variables.",
        epilog=_environment_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    parser.add_argument("--version", action="version", version=f"eventfleet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, *, modules: bool = True) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_, epilog=_environment_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        return _with_modules(command) if modules else command

    migrate = add("migrate", "create or upgrade the schema (idempotent, safe concurrently)")
    migrate.add_argument("--roles", action="store_true",
                         help="also create the NOLOGIN roles <schema>_writer, _relay, _worker, _reactor and "
                              "grant their privileges (needs CREATEROLE; idempotent)")
    add("relay", "publish the outbox to RabbitMQ until SIGTERM/SIGINT")
    worker = add("worker", "apply projections until SIGTERM/SIGINT")
    worker.add_argument("--projection", action="append", default=[], metavar="NAME",
                        help="projection to run (repeatable); default: all registered")
    status = add("status", "lag, parked failures and outbox backlog per projection")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument("--partitions", action="store_true",
                        help="list every partition with its owner and lag, not only the slowest")
    rebuild = add("rebuild", "rebuild a projection from the store, swap atomically")
    rebuild.add_argument("name", metavar="NAME")
    load = add("load", "the orders example: place orders and drive each through a random life", modules=False)
    load.add_argument("--orders", type=int, required=True, metavar="N")
    load.add_argument("--concurrency", type=int, default=8, metavar="N")
    load.add_argument("--seed", type=int, default=None, metavar="S")
    demo = add("demo", "the main job end to end on one machine (runs the orders example)")
    demo.add_argument("--orders", type=int, default=2000, metavar="N")
    dead = add("dead-letters", "inspect, re-drive and skip parked failures")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl_list = dead_sub.add_parser("list", help="list parked failures")
    dl_list.add_argument("--projection", default=None, metavar="NAME")
    dl_retry = dead_sub.add_parser("retry", help="re-drive a parked failure and release its stream")
    dl_retry.add_argument("id", type=int, metavar="ID")
    dl_show = dead_sub.add_parser("show", help="print one dead letter in full, its traceback included")
    dl_show.add_argument("id", type=int, metavar="ID")
    dl_skip = dead_sub.add_parser("skip", help="move a parked failure's stream past it without applying it")
    dl_skip.add_argument("id", type=int, metavar="ID")
    teardown = add("teardown", "drop the deployment: its schema and rebuild shadows, queues, "
                   "exchanges and roles (nothing of any other)")
    teardown.add_argument("--yes", action="store_true", help="really drop; without it, list what would go, exit 2")
    teardown.add_argument("--force", action="store_true",
                          help="drop even while workers are live or a relay is connected or holds a claim")
    retire = add("retire", "remove a read model no longer in the code: its queues (still filling on the broker), "
                 "checkpoints, status, dead letters and rebuild shadows; its tables with --drop-tables")
    retire.add_argument("name", metavar="NAME")
    retire.add_argument("--drop-tables", action="store_true", dest="drop_tables",
                        help="also drop the tables its recorded types name (kept by default)")
    retire.add_argument("--yes", action="store_true", help="really remove; without it, list what would go, exit 2")
    verify = add("verify", "compare a projection's read model with a replay of the store (exit 1 if any row differs)")
    verify.add_argument("projection", metavar="PROJECTION")
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument("--limit", type=int, default=20, metavar="N",
                        help="keys of differing rows shown per table and side (default 20)")
    forget = add("forget", "forget a subject: delete its data key and append SubjectForgotten (its personal "
                 "fields read as erased from then on)", modules=False)
    forget.add_argument("subject", metavar="SUBJECT")
    add("rewrap-keys", "wrap every subject key with the newest key-encryption key (after adding one to "
        "EVENTFLEET_KEK)", modules=False)
    close_stream = add("close-stream", "close a stream: append StreamClosed; appends to it fail from then on",
                       modules=False)
    close_stream.add_argument("stream", metavar="STREAM")
    close_stream.add_argument("--reason", default="", metavar="TEXT", help="why, kept in the StreamClosed event")
    archive = add("archive", "move a closed stream's events to events_archive, audited in archive_log, and "
                  "append StreamArchived to archived-STREAM", modules=False)
    archive.add_argument("stream", metavar="STREAM")
    archive.add_argument("--reason", required=True, metavar="TEXT", help="why, kept in archive_log and the event")
    archive.add_argument("--by", default=None, metavar="WHO",
                         help="who archives, kept in archive_log (default: the OS user@host)")
    archive.add_argument("--yes", action="store_true",
                         help="really archive; without it, say what it would do and exit 2")
    republish = add("republish", "publish a publication's events again from a global position (for a consumer "
                    "that lost its data; the workers running it publish them)")
    republish.add_argument("name", metavar="NAME")
    republish.add_argument("--from", dest="from_position", required=True, metavar="POSITION",
                           type=_republish_position, help="a global position (an event's position attribute), "
                           "or start")
    return parser


def _republish_position(value: str) -> int:
    from workers.cli.republish import position  # imported on use, like the commands

    return position(value)


def _version() -> str:
    try:
        return importlib.metadata.version("eventfleet")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _resolve(command: str) -> Command:
    module, _, function = _COMMANDS[command].partition(":")
    fn: Command = getattr(importlib.import_module(module), function)
    return fn


def _diagnose(exc: errors.EventFleetError, settings: Settings) -> errors.EventFleetError:
    """The error to report: a missing table in a schema never migrated is ``SchemaNotMigrated`` (which says to
    run ``eventfleet migrate``), whichever command met it; any other error is reported as it is."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, asyncpg.UndefinedTableError):
        cause = cause.__cause__
    if cause is None:
        return exc
    from workers.admin import migrate  # only on this path: most commands never need it

    try:
        asyncio.run(migrate.check_migrated(settings.database_url, settings.schema))
    except errors.SchemaNotMigrated as not_migrated:
        return not_migrated
    except errors.EventFleetError:
        pass  # cannot tell: report the error as it is
    return exc


#: The commands that hold events in memory by the byte limits: they refuse limits that cannot all hold.
_BUDGETED = ("relay", "worker")


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Parse, configure logging, run the subcommand; print a one-line reason and return 1 on error."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ if environ is None else environ)
        if args.command in _BUDGETED:
            settings.check_limits()
    except errors.ConfigError as exc:
        print(f"eventfleet: configuration error: {exc}", file=sys.stderr)
        return 2
    tuning.pin_mmap_threshold()  # long-running commands: keep the heap from fragmenting (see there)
    secrets = redact.secrets_of(settings.database_url, *settings.amqp_urls)
    logs.setup(settings.log_format, logging.DEBUG if args.verbose else logging.INFO, secrets=secrets)
    try:
        settings = settings.with_projection_modules(*getattr(args, "projection_module", ()))
        registry.add_app_dir(getattr(args, "app_dir", "."))
        registry.load(settings.projection_modules)
        command = _resolve(args.command)
        tuning.tune_gc()  # after the imports: they are the start-up heap it freezes
        return asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return 0
    except errors.EventFleetError as exc:
        logger.debug("command failed", exc_info=True)
        print(redact.text(f"eventfleet {args.command}: {_diagnose(exc, settings)}", secrets), file=sys.stderr)
        return 1
    except Exception as exc:
        logger.debug("command failed", exc_info=True)
        print(redact.text(f"eventfleet {args.command}: unexpected {type(exc).__name__}: {exc}", secrets),
              file=sys.stderr)
        return 1

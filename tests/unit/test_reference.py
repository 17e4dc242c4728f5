"""docs/reference.md names what the code has: each test derives a list from the code and finds it there."""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import os
import re
import uuid
from pathlib import Path

import msgpack
import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import eventfleet
import workers.cli.relay
import workers.cli.worker
import workers.projector.worker
import workers.relay
import workers.runtime.metrics
from eventfleet import _guard
from projections import registry, wait
from store import errors as store_errors
from workers import broker, cli, locks
from workers import errors as worker_errors
from workers.admin.status import ProjectionStatus, ReactorStatus, Report
from workers.config import ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()
README = (ROOT / "README.md").read_text()
# Referenced by the modules imported above (relay and worker processes register nothing else).
_IMPORTED_FOR_THEIR_METRICS = (workers.cli.relay, workers.cli.worker, workers.projector.worker, workers.relay,
                               workers.runtime.metrics)


def section(heading: str) -> str:
    """The reference's text under ``heading`` (a whole heading line) up to the next heading of any level."""
    lines = REFERENCE.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def rows(text: str) -> dict[str, list[str]]:
    """The rows of the markdown tables in ``text`` by their first cell, backticks stripped."""
    found = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # not at \|
            found[cells[0].strip("`")] = cells
    return found


def paragraph(start: str) -> str:
    """The reference's paragraph that begins with ``start``."""
    match = re.search(rf"^{re.escape(start)}.*?(?=\n\n)", REFERENCE, re.MULTILINE | re.DOTALL)
    assert match is not None
    return match.group(0)


def code_block(text: str) -> str:
    """The first fenced block of ``text``."""
    match = re.search(r"^```\w*\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert match is not None
    return match.group(1)


# --- configuration ------------------------------------------------------------------------------------


def test_the_configuration_table_names_exactly_the_variables_of_environment() -> None:
    documented = {name for name in rows(section("## 1. Configuration")) if name.startswith("EVENTFLEET_")}
    assert documented == {name for name, _, _ in ENVIRONMENT}


def test_each_variable_has_its_default_from_environment() -> None:
    table = rows(section("## 1. Configuration"))
    documented = {name: table.get(name, [name, "(not in the table)"])[1].strip("`") for name, _, _ in ENVIRONMENT}
    wrong = [(name, documented[name]) for name, default, _ in ENVIRONMENT if documented[name] != default]
    assert wrong == []


def test_the_tests_variables_are_documented_with_their_defaults() -> None:
    text = section("## 1. Configuration")
    assert "`TEST_DATABASE_URL` (default `postgresql://postgres@127.0.0.1:5432/test`)" in text
    assert "`TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/`)" in text


# --- command line -------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public way to walk its subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(parser: argparse.ArgumentParser, prefix: str = "eventfleet") -> dict[str, argparse.ArgumentParser]:
    """Every command line the parser accepts, as ``eventfleet dead-letters retry``, with its parser."""
    found = {}
    for name, sub in _subparsers(parser).items():
        line = f"{prefix} {name}"
        nested = _commands(sub, line)
        found.update(nested or {line: sub})
    return found


def test_every_command_and_sub_action_of_the_parser_is_in_the_commands_table() -> None:
    documented = " ".join(rows(section("### 2.2 Commands")))
    missing = [line for line in _commands(cli.build_parser()) if not re.search(rf"{re.escape(line)}(?![\w-])",
                                                                                documented)]
    assert missing == []


def test_every_option_of_every_command_is_in_the_command_line_section() -> None:
    text = section("## 2. Command line") + section("### 2.1 Global options and exit statuses") + section(
        "### 2.2 Commands")
    parsers = {"eventfleet": cli.build_parser(), **_commands(cli.build_parser())}
    options = {option for parser in parsers.values() for action in parser._actions
               for option in action.option_strings if option.startswith("--") and option != "--help"}
    assert sorted(option for option in options if not re.search(rf"{option}(?![\w-])", text)) == []


def test_every_key_of_status_json_is_in_its_table() -> None:
    report = Report([ProjectionStatus("p", "live", 0, 0, 0.0, 0, None)], 0, 0.0,
                    reactors=[ReactorStatus("r", 0, None, None, 0, 0)])
    document = report.to_json()
    keys = [f"projections[].{key}" for key in document["projections"][0]] + [
        f"outbox.{key}" for key in document["outbox"]] + [f"reactors[].{key}" for key in document["reactors"][0]] + [
        f"broker.{key}" for key in document["broker"]]
    table = rows(section("### 2.3 Output"))
    assert [key for key in keys if key not in table] == []


# --- Python API ---------------------------------------------------------------------------------------


def test_the_api_table_groups_exactly_the_names_of_all() -> None:
    table = rows(section("## 3. Python API"))
    grouped = [name for cells in table.values() if cells[0] != "group" for name in re.findall(r"`(\w+)`", cells[1])]
    assert sorted(grouped) == sorted(eventfleet.__all__)


ERROR_MODULES = (store_errors, worker_errors)


def _error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in store/errors.py and workers/errors.py, and the few defined beside them."""
    found = {name: cls for module in ERROR_MODULES for name, cls in inspect.getmembers(module, inspect.isclass)
             if issubclass(cls, BaseException) and cls.__module__ == module.__name__}
    return found | {"ProjectionModuleNotFound": registry.ProjectionModuleNotFound, "WaitTimeout": wait.WaitTimeout,
                    "WaitFailed": wait.WaitFailed, "StreamHalted": wait.StreamHalted,
                    "UnknownProjection": wait.UnknownProjection,
                    "ShadowedPackage": _guard.ShadowedPackage}


def _tree() -> dict[str, str | None]:
    """The error tree's classes and the parent each is drawn under (None for a root)."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in code_block(section("### 3.6 The error tree")).splitlines():
        match = re.match(r"^([│├└─ ]*)([A-Z]\w*)", line)
        if match is None or not (match.group(1) == "" or match.group(1).endswith("── ")):
            continue  # a continuation line
        depth, name = len(match.group(1)) // 4, match.group(2)
        del stack[depth:]
        parents[name] = stack[-1] if stack else None
        stack.append(name)
    return parents


def test_every_error_class_is_in_the_error_tree() -> None:
    tree = _tree()
    assert sorted(name for name in _error_classes() if name not in tree) == []


def test_each_error_class_is_drawn_under_its_base_class() -> None:
    tree, classes = _tree(), _error_classes()
    drawn = {name: parent for name, parent in tree.items() if name in classes}
    assert drawn == {name: classes[name].__bases__[0].__name__ if classes[name] is not store_errors.EventFleetError
                     else None for name in drawn}


# --- tables, messages, metrics, locks -----------------------------------------------------------------

_CREATED = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+) \(")
_ADDED = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")


def _columns(body: str) -> list[str]:
    """The column names of a CREATE TABLE's parenthesized body (constraints left out)."""
    parts, depth, current = [], 0, ""
    for char in body:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.split()[0] for part in parts if part.split() and part.split()[0] != "CONSTRAINT"]


def _migrated_columns() -> dict[str, list[str]]:
    """Every table ``migrate`` creates (the migrations and store/migrate.py's own) and its columns."""
    sources = [p.read_text() for p in sorted((ROOT / "store" / "sql" / "migrations").glob("*.sql"))]
    # store/migrate.py writes its statement as adjacent string literals: join them.
    sources.append(re.sub(r'"\s*\n\s*"', "", (ROOT / "store" / "migrate.py").read_text()))
    tables: dict[str, list[str]] = {}
    for text in sources:
        text = re.sub(r"--[^\n]*", "", text)
        for match in _CREATED.finditer(text):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            tables[match.group(1)] = _columns(text[match.end():end - 1])
        for table, column in _ADDED.findall(text):
            tables[table].append(column)
    return tables


def test_every_table_migrate_creates_is_in_the_tables_table() -> None:
    table = rows(section("### 4.1 The store's and the workers' tables"))
    assert sorted(name for name in _migrated_columns() if name not in table) == []


def test_every_column_migrate_creates_is_in_its_tables_row() -> None:
    table = rows(section("### 4.1 The store's and the workers' tables"))
    missing = [f"{name}.{column}" for name, columns in _migrated_columns().items() if name in table
               for column in columns if f"`{column} " not in table[name][1]]
    assert missing == []


def test_every_key_and_header_of_a_message_is_in_the_messages_section() -> None:
    row = {"event_id": uuid.uuid4(), "stream_id": "s", "version": 0, "global_position": 1, "transaction_id": 2,
           "event_type": "E.v1", "data": b"\x80", "metadata": b"\x80", "recorded_at": dt.datetime.now(dt.UTC)}
    message = broker.encode_undecodable_row(row, "why")  # a flagged message carries every key there is
    keys = list(msgpack.unpackb(message.body, timestamp=0))
    table = rows(section("## 6. Messages (RabbitMQ)"))
    text = paragraph("- **The per-event message**")
    missing = [key for key in keys if key not in table] + [
        header for header in message.headers if f"`{header}`" not in text]
    assert missing == []


def test_the_message_properties_are_in_the_messages_section() -> None:
    message = broker.message_from_body(b"", uuid.uuid4(), "E.v1", "s", 0)
    text = paragraph("- **The per-event message**")
    assert f"`content_type` = `{message.content_type}`" in text
    assert f"`delivery_mode` = {int(message.delivery_mode)} (persistent)" in text
    assert "`message_id` = the event id" in text


#: What the reference writes for the parts of a name (``{prefix}.{projection}.{partition}``), and a value of each.
PLACEHOLDERS = {"prefix": "PREFIX", "projection": "projection", "partition": 0, "group": "group"}


def _broker_names() -> list[str]:
    """Every name ``broker.Names`` derives: its properties, and its methods called with placeholder values."""
    names = broker.Names(str(PLACEHOLDERS["prefix"]))
    derived = []
    for attribute, member in vars(broker.Names).items():
        if attribute.startswith("_"):
            continue
        if isinstance(member, property):
            derived.append(getattr(names, attribute))
        elif callable(member):
            parameters = list(inspect.signature(member).parameters)[1:]
            derived.append(getattr(names, attribute)(*(PLACEHOLDERS[p] for p in parameters)))
    return derived


def test_every_exchange_and_queue_name_is_in_a_names_table() -> None:
    table = rows(section("## 6. Messages (RabbitMQ)"))
    documented = {name.format(**PLACEHOLDERS) for name in table if name.startswith("{prefix}")}
    assert [name for name in _broker_names() if name not in documented] == []


def test_every_header_and_property_of_a_batch_message_is_in_the_messages_section() -> None:
    row = {"event_id": uuid.uuid4(), "stream_id": "s", "version": 0, "global_position": 1, "transaction_id": 2,
           "event_type": "E.v1", "data": b"\x80", "metadata": b"\x80", "recorded_at": dt.datetime.now(dt.UTC)}
    message = broker.batch_message(3, [row], [broker.event_map(row)])  # flagged: every header there is
    text = paragraph("- **Properties and headers**")
    missing = [header for header in message.headers if f"`{header}`" not in text]
    assert (missing, f"`type` = `{message.type}`" in text) == ([], True)


def _metrics() -> dict[str, str]:
    """Every eventfleet metric of the default registry as exposed (counters with ``_total``), with its type."""
    return {family.name + ("_total" if family.type == "counter" else ""): family.type
            for family in REGISTRY.collect() if family.name.startswith("eventfleet_")}


def test_the_metrics_table_names_exactly_the_registered_metrics() -> None:
    documented = {name for name in rows(section("## 7. Metrics and HTTP endpoints")) if name.startswith("eventfleet_")}
    assert documented == set(_metrics())


def test_each_metric_has_its_registered_type() -> None:
    table = rows(section("## 7. Metrics and HTTP endpoints"))
    assert {name: table.get(name, ["", "(not in the table)"])[1] for name in _metrics()} == _metrics()


def test_each_metric_has_its_registered_labels() -> None:
    table = rows(section("## 7. Metrics and HTTP endpoints"))
    labels = {}
    for c in vars(workers.runtime.metrics).values():
        if isinstance(c, workers.runtime.metrics.BatchHistogram):
            labels[c.name] = [c.label]
        elif isinstance(c, MetricWrapperBase):
            # prometheus_client keeps a metric's name and labels private: nothing public lists them.
            labels[c._name + ("_total" if c._type == "counter" else "")] = list(c._labelnames)
    assert set(labels) == set(_metrics())
    assert {name: re.findall(r"`(\w+)`", table.get(name, ["", "", "(not in the table)"])[2])
            for name in labels} == labels


def test_every_advisory_lock_key_is_in_the_locks_table() -> None:
    keys = [locks.projection("<schema>", "<name>"), locks.leases("<schema>"),
            locks.rebuild("<schema>", "<name>"), locks.watermark("<schema>", "<name>"), locks.migrate("<schema>")]
    table = rows(section("## 9. Advisory locks"))
    assert [key for key in keys if key not in table] == []


# --- the README ---------------------------------------------------------------------------------------


def test_the_readme_links_the_reference() -> None:
    assert "](docs/reference.md)" in README


#: Where the old contract lived, outside the repository (split, so that this file does not cite it itself).
OUTSIDE = "../" + "shared"


def test_the_readme_points_nowhere_outside_the_repository() -> None:
    assert OUTSIDE not in README


_HISTORY = {"BENCHMARKS.md", "RELIABILITY.md"}  # dated records of what was measured, kept as written
_SKIPPED = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
            ".hypothesis", "build", "dist"}


@pytest.mark.parametrize("outside", [OUTSIDE, "CONTRACT" + ".md"])
def test_no_doc_or_docstring_cites_the_old_contract(outside: str) -> None:
    found = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if d not in _SKIPPED and not d.endswith(".egg-info")]
        for file in files:
            path = Path(directory, file)
            if (path.suffix in (".py", ".md", ".yaml", ".yml") and file not in _HISTORY
                    and outside in path.read_text(errors="replace")):
                found.append(str(path.relative_to(ROOT)))
    assert found == []

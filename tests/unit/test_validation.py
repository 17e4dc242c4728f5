"""Validation at the edges: hostile names, stream ids and versions are refused before any I/O."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections import registry, wait
from projections.base import Projection
from store import errors, names, queries
from store.event_store import EventStore
from workers import broker
from workers.config import Settings

INJECTIONS = [
    'x"; DROP TABLE events; --',
    "x; DROP SCHEMA public CASCADE",
    "x' OR '1'='1",
    'eventfleet"."events',
    "Events",
    "x y",
    "x\x00",
    "1abc",
    "",
    "a" * 49,
    "événements",
    "x\n",
    "x--",
    "pg_catalog.pg_roles",
    "x$1",
]


class NoPool:
    """A pool that fails the test if anything reaches it: validation must come first."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the database was reached ({name}) before validation")


@pytest.mark.parametrize("value", INJECTIONS)
def test_identifier_refuses_injection(value: str) -> None:
    with pytest.raises(errors.InvalidName):
        names.identifier(value)
    with pytest.raises(errors.InvalidName):
        names.quote(value)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_identifier_accepts_only_plain_lowercase_words(value: str) -> None:
    try:
        accepted = names.identifier(value)
    except errors.InvalidName:
        return
    assert re.fullmatch(r"[a-z_][a-z0-9_]{0,47}", accepted)
    assert names.quote(accepted) == f'"{accepted}"'


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_stream_id_is_either_safe_text_or_invalid_stream_id(value: str) -> None:
    try:
        accepted = names.stream_id(value)
    except errors.InvalidStreamId:
        assert not value or len(value) > names.MAX_STREAM_ID_LENGTH or not value.isprintable()
        return
    assert 1 <= len(accepted) <= names.MAX_STREAM_ID_LENGTH
    assert "\x00" not in accepted
    accepted.encode("utf-8")


@pytest.mark.parametrize("value", ["", "a\x00b", "\x00", "x" * 10_000, "x" * 256, "line\nbreak", "\ud800",
                                   None, 7, b"order-1"])
def test_bad_stream_ids_are_refused(value: Any) -> None:
    with pytest.raises(errors.InvalidStreamId):
        names.stream_id(value)


@pytest.mark.parametrize("value", ['order-"1"', "order-'1'", "ordre-é-日本-🎉", "x" * 255, "a b", "\\'; --"])
def test_good_stream_ids_pass_unchanged(value: str) -> None:
    assert names.stream_id(value) is value


@pytest.mark.parametrize("value", [v for v in INJECTIONS if "\x00" not in v])  # an environ cannot hold NUL
def test_settings_refuse_an_injected_schema_naming_the_variable(value: str) -> None:
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_SCHEMA"):
        Settings.from_env({"EVENTFLEET_SCHEMA": value})


@pytest.mark.parametrize("value", ['x"; DROP', "a b", "x/y", "", "x" * 101, "é"])
def test_settings_refuse_a_bad_prefix(value: str) -> None:
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_PREFIX"):
        Settings.from_env({"EVENTFLEET_PREFIX": value})


@pytest.mark.parametrize("value", INJECTIONS)
def test_the_projection_registry_refuses_injected_names(value: str) -> None:
    with pytest.raises(errors.InvalidName):
        registry.get(value)
    with pytest.raises(errors.InvalidName):
        broker.Names("eventfleet").queue(value)

    with pytest.raises(errors.InvalidName):
        @registry.register
        class Evil(Projection):
            name = value
            tables = ()
            ddl = "SELECT 1"
    assert value not in registry.REGISTRY


@pytest.mark.parametrize("value", INJECTIONS)
def test_event_store_refuses_an_injected_schema(value: str) -> None:
    with pytest.raises(errors.InvalidName):
        EventStore(NoPool(), schema=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", INJECTIONS)
async def test_bound_queries_and_wait_for_refuse_an_injected_schema(value: str) -> None:
    with pytest.raises(errors.InvalidName):
        queries.bind(queries.TEMPLATES, value)
    with pytest.raises(errors.InvalidName):
        await wait.wait_for(NoPool(), "order_summary", "order-1", 0, 0, schema=value)  # type: ignore[arg-type]



# --- TLS options pass through untouched ------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "postgresql://app:pw@db.example:5432/prod?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem",
    "postgresql://app@db.example/prod?sslmode=require&sslcert=/c.pem&sslkey=/k.pem",
    "postgres://app@h1:5432,h2:5433/prod?sslmode=prefer&target_session_attrs=read-write",
    "postgresql:///prod?host=/var/run/postgresql",
])
def test_database_tls_options_are_kept_verbatim(url: str) -> None:
    assert Settings.from_env({"EVENTFLEET_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize("url", [
    "amqps://svc:pw@mq.example:5671/vhost?cafile=/etc/ssl/ca.pem&keyfile=/k.pem&certfile=/c.pem&no_verify_ssl=0",
    "amqps://mq.example/",
    "amqp://guest:guest@127.0.0.1:5672/?heartbeat=30",
])
def test_broker_tls_options_are_kept_verbatim(url: str) -> None:
    assert Settings.from_env({"EVENTFLEET_AMQP_URL": url}).amqp_url == url


@pytest.mark.parametrize(("variable", "url"), [
    ("EVENTFLEET_DATABASE_URL", "postgresql://u:S3c/ret@PG@127.0.0.1/test"),
    ("EVENTFLEET_DATABASE_URL", "postgresql://u:S3cretPG@[::1/test"),
    ("EVENTFLEET_DATABASE_URL", "postgresql://u:S3cretPG@127.0.0.1:99999/test"),
    ("EVENTFLEET_AMQP_URL", "amqp://u:S3c/retMQ@127.0.0.1/"),
    ("EVENTFLEET_AMQP_URL", "amqp://u:S3cretMQ@127.0.0.1:port/"),
    ("EVENTFLEET_DATABASE_URL", "mysql://u:S3cretPG@127.0.0.1/test"),
])
def test_a_malformed_url_is_refused_without_echoing_it(variable: str, url: str) -> None:
    with pytest.raises(errors.ConfigError, match=variable) as info:
        Settings.from_env({variable: url})
    assert "S3c" not in str(info.value)

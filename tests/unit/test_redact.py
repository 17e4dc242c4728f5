"""Credentials never reach a log line, an error message or a printed Settings."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import urllib.parse
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import errors
from workers import cli
from workers.config import Settings
from workers.relay import RelayConfig
from workers.runtime import logs, redact, tuning

PG = "postgresql://app:Pg-S3cret%40x@db.example:5432/prod?sslmode=verify-full"
MQ = "amqps://svc:Mq-S3cret@mq.example:5671/vhost?cafile=/etc/ca.pem"


@pytest.mark.parametrize(("url", "masked"), [
    (PG, "postgresql://app:***@db.example:5432/prod?sslmode=verify-full"),
    (MQ, "amqps://svc:***@mq.example:5671/vhost?cafile=/etc/ca.pem"),
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
    ("postgresql://u@h/db?password=xyz12&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
    ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres"),
    ("postgresql://u:p@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
    ("postgresql://u:p@[::1/db", "postgresql://***"),
])
def test_url_masks_the_password_and_keeps_everything_else(url: str, masked: str) -> None:
    assert redact.url(url) == masked


def test_secrets_of_finds_passwords_as_written_and_decoded() -> None:
    found = redact.secrets_of(PG, MQ, "postgresql://u@h/db?password=Qp-777")
    assert set(found) == {"Pg-S3cret%40x", "Pg-S3cret@x", "Mq-S3cret", "Qp-777"}
    assert redact.secrets_of("postgresql://postgres@127.0.0.1/db") == ()


def test_text_masks_secrets_and_any_url_password() -> None:
    secrets = redact.secrets_of(PG, MQ)
    line = "auth failed for Pg-S3cret@x via amqp://other:hunter22@h/ and dsn host=h password=zzz9 end"
    out = redact.text(line, secrets)
    for leak in ("Pg-S3cret", "hunter22", "zzz9"):
        assert leak not in out
    assert out == "auth failed for *** via amqp://other:***@h/ and dsn host=h password=*** end"


def test_a_short_password_is_masked_in_urls_but_does_not_erase_words() -> None:
    out = redact.text("user a wrote to amqp://u:ab@h/", redact.secrets_of("amqp://u:ab@h/"))
    assert out == "user a wrote to amqp://u:***@h/"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="*"), min_size=4, max_size=30),
       st.text(max_size=40), st.text(max_size=40))
def test_a_configured_secret_never_survives_text(secret: str, before: str, after: str) -> None:
    quoted = urllib.parse.quote(secret, safe="")
    secrets = redact.secrets_of(f"amqp://user:{quoted}@host/")
    assert secret in secrets
    assert quoted in secrets
    for form in (secret, quoted):
        assert form not in redact.text(before + form + after, secrets)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_formatted_record_is_redacted(log_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup(log_format, logging.DEBUG, secrets=redact.secrets_of(PG, MQ))
        log = logging.getLogger("test.redact")
        log.info("connecting to %s", PG)
        log.warning("outage", extra={"cause": "login Mq-S3cret refused", "url": MQ})
        try:
            raise ConnectionError(f"could not reach {PG} with Pg-S3cret@x")
        except ConnectionError:
            log.exception("failed")
        log.debug("stack", stack_info=True, extra={"settings": Settings(database_url=PG, amqp_url=MQ)})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    output = stream.getvalue()
    assert "ConnectionError" in output
    assert "db.example" in output
    for leak in ("Pg-S3cret", "Mq-S3cret"):
        assert leak not in output
    if log_format == "json":
        docs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        assert [d["message"] for d in docs] == [
            "connecting to postgresql://app:***@db.example:5432/prod?sslmode=verify-full", "outage", "failed",
            "stack"]


def test_settings_repr_hides_passwords_but_keeps_tls_options() -> None:
    text = repr(Settings(database_url=PG, amqp_url=MQ))
    assert "S3cret" not in text
    assert "sslmode=verify-full" in text
    assert "amqps://svc:***@mq.example:5671/vhost?cafile=/etc/ca.pem" in text


def test_cli_main_redacts_its_logs_and_its_error_line(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    async def leaky(settings: Settings, args: argparse.Namespace) -> int:
        logging.getLogger("test.leaky").warning("connecting to %s and %s", settings.database_url, settings.amqp_url)
        raise errors.TransientError(f"could not reach {settings.database_url} (password Pg-S3cret@x)")

    monkeypatch.setitem(cli._COMMANDS, "migrate", f"{__name__}:LEAKY")
    monkeypatch.setattr(tuning, "tune_gc", lambda: None)  # not the test process's collector
    monkeypatch.setattr(sys.modules[__name__], "LEAKY", leaky, raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        code = cli.main(["migrate"], environ={"EVENTFLEET_DATABASE_URL": PG, "EVENTFLEET_AMQP_URL": MQ})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    out, err = capsys.readouterr()
    assert code == 1
    assert "connecting to postgresql://app:***@db.example" in err
    assert "eventfleet migrate: could not reach postgresql://app:***@db.example" in err
    assert "S3cret" not in out + err


# A password with an unencoded '@': urllib and the drivers split it at different '@'s.
AT_TAIL = "tailofthepassword"
PG_AT = f"postgresql://app:front@{AT_TAIL}@db.example:5432/prod"
MQ_AT = f"amqp://svc:front@{AT_TAIL}@mq.example:5672/"


@pytest.mark.parametrize(("variable", "url"), [("EVENTFLEET_DATABASE_URL", PG_AT), ("EVENTFLEET_AMQP_URL", MQ_AT),
                                               ("EVENTFLEET_AMQP_URL", f"amqp://g:g@mq1:5672/,{MQ_AT}")])
def test_a_password_with_an_unencoded_at_is_refused_with_the_encoding_to_use(variable: str, url: str) -> None:
    with pytest.raises(errors.ConfigError) as refused:
        Settings.from_env({variable: url})

    assert str(refused.value).startswith(f"{variable}")
    assert "more than one '@' before the host: write each '@' of the user or password as %40" in str(refused.value)
    assert "front" not in str(refused.value)
    assert AT_TAIL not in str(refused.value)
    assert Settings.from_env({variable: url.replace("front@", "front%40")})  # as the message says: accepted


def test_the_cli_refuses_an_unencoded_at_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["status"], environ={"EVENTFLEET_DATABASE_URL": PG_AT})

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("eventfleet: configuration error: EVENTFLEET_DATABASE_URL has more than one '@'")
    assert AT_TAIL not in err


@pytest.mark.parametrize("shown", [
    lambda: repr(Settings(database_url=PG_AT, amqp_url=MQ_AT)),
    lambda: repr(RelayConfig(database_url=PG_AT, schema="s", amqp_url=MQ_AT, prefix="p", projections=())),
    lambda: str(RelayConfig(database_url=PG_AT, schema="s", amqp_url=MQ_AT, prefix="p", projections=())),
    lambda: redact.text(f"could not reach {PG_AT} nor {MQ_AT}"),
], ids=["Settings", "RelayConfig", "str(RelayConfig)", "text"])
def test_no_part_of_a_password_with_an_at_is_shown(shown: Callable[[], str]) -> None:
    text = shown()

    assert "front" not in text
    assert AT_TAIL not in text


def test_relay_config_repr_hides_both_passwords_and_keeps_the_rest() -> None:
    config = RelayConfig(database_url=PG, schema="s", amqp_url=MQ, prefix="p", projections=("a",))

    assert repr(config) == (
        "RelayConfig(database_url='postgresql://app:***@db.example:5432/prod?sslmode=verify-full', schema='s', "
        "amqp_url='amqps://svc:***@mq.example:5671/vhost?cafile=/etc/ca.pem', prefix='p', projections=('a',), "
        "batch_size=1000, poll_interval=1.0, metrics_interval=5.0, confirm_timeout=30.0, stop_timeout=10.0, "
        "partitions=None, events_exchange=False, group=None, message_events=100, message_bytes=1048576, "
        "amqp_urls=('amqps://svc:***@mq.example:5671/vhost?cafile=/etc/ca.pem',), "
        "timeouts=Timeouts(idle_in_transaction=0.0, lock=0.0, statement=0.0), batch_bytes=16777216)")

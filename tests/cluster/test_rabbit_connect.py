"""Several RabbitMQ URLs (workers/runtime/amqp.py, Settings.amqp_urls) and the flow-control state in Health, without
a cluster: the order nodes are tried in, heartbeats, settings, and connecting past nodes that do not answer (the
one live node is the machine's default broker, only connected to)."""

from __future__ import annotations

import collections
import logging
import random
import socket

import pytest

from store.errors import ConfigError
from tests.conftest import AMQP_URL
from workers import errors, relay
from workers.config import Settings
from workers.runtime import amqp, health, metrics

URLS = ["amqp://u:secret1@127.0.0.1:5681/", "amqp://u:secret1@127.0.0.1:5682/", "amqp://u:secret1@127.0.0.1:5683/"]


def test_a_comma_separated_amqp_url_gives_every_node_and_the_first_as_amqp_url() -> None:
    settings = Settings.from_env({"EVENTFLEET_AMQP_URL": " , ".join(URLS) + ","})
    assert settings.amqp_urls == tuple(URLS)
    assert settings.amqp_url == URLS[0]
    assert "secret1" not in repr(settings)
    assert Settings.from_env({}).amqp_urls == (Settings().amqp_url,)


def test_each_url_is_checked_and_named_by_its_place_never_echoed() -> None:
    with pytest.raises(ConfigError, match=r"URL 2 of 2\) must be an amqp") as bad_scheme:
        Settings.from_env({"EVENTFLEET_AMQP_URL": f"{URLS[0]},http://u:secret1@h/"})
    with pytest.raises(ConfigError, match=r"URL 2 of 2\) is not a valid URL") as bad_port:
        Settings.from_env({"EVENTFLEET_AMQP_URL": f"{URLS[0]},amqp://u:secret1@h:99999/"})
    for raised in (bad_scheme, bad_port):
        assert "secret1" not in str(raised.value)
    with pytest.raises(ConfigError, match="must be an amqp"):
        Settings.from_env({"EVENTFLEET_AMQP_URL": " , "})


def test_settings_built_in_code_keep_amqp_url_and_amqp_urls_in_step() -> None:
    assert Settings(amqp_url=URLS[1]).amqp_urls == (URLS[1],)
    assert Settings(amqp_url=URLS[0], amqp_urls=tuple(URLS)).amqp_url == URLS[0]
    with pytest.raises(ValueError, match="first of"):
        Settings(amqp_url=URLS[1], amqp_urls=tuple(URLS))
    config = relay.RelayConfig.from_settings(Settings(amqp_url=URLS[0], amqp_urls=tuple(URLS)))
    assert (config.amqp_url, config.amqp_urls) == (URLS[0], tuple(URLS))
    assert relay.RelayConfig(database_url="postgresql://x", schema="s", amqp_url=URLS[2], prefix="p",
                             projections=()).amqp_urls == (URLS[2],)


def test_first_connections_spread_and_a_reconnection_tries_the_node_lost_last() -> None:
    rng = random.Random(1)
    firsts = collections.Counter(amqp.order(URLS, rng=rng)[0] for _ in range(300))
    assert set(firsts) == set(URLS)
    assert min(firsts.values()) > 60
    after_loss = collections.Counter(tuple(amqp.order(URLS, "127.0.0.1:5682", rng=rng)) for _ in range(300))
    assert set(after_loss) == {(URLS[0], URLS[2], URLS[1]), (URLS[2], URLS[0], URLS[1])}  # elsewhere first, spread
    assert min(after_loss.values()) > 100
    assert sorted(amqp.order(URLS, "elsewhere:1")) == sorted(URLS)  # unknown: a random start, each once
    assert amqp.order(URLS[:1], "127.0.0.1:5681") == URLS[:1]


def test_a_url_gets_a_heartbeat_unless_it_names_one() -> None:
    assert amqp.with_heartbeat(URLS[0]) == URLS[0] + "?heartbeat=10"
    assert amqp.with_heartbeat(URLS[0] + "?heartbeat=3") == URLS[0] + "?heartbeat=3"
    assert amqp.with_heartbeat("amqp://h/vh?name=x", 7) == "amqp://h/vh?name=x&heartbeat=7"
    assert amqp.endpoint("amqp://h/") == "h:5672"
    assert amqp.endpoint("amqps://u:p@h/") == "h:5671"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


async def test_connect_goes_past_nodes_that_refuse_to_one_that_answers() -> None:
    dead = [f"amqp://guest:guest@127.0.0.1:{_dead_port()}/" for _ in range(2)]
    urls = [*dead, AMQP_URL]
    connection = await amqp.connect(urls, name="eventfleet test connect", after=amqp.endpoint(dead[1]))
    try:
        assert amqp.connection_endpoint(connection) == amqp.endpoint(AMQP_URL)
        assert amqp.watch_blocked(connection, lambda _: None, lambda: None), "aiormq's handlers moved: see amqp.py"
    finally:
        await connection.close()
    connection = await amqp.connect(urls, name="eventfleet test connect")  # from anywhere: it finds the live one
    await connection.close()


async def test_connect_raises_an_outage_naming_every_node_without_passwords_when_none_answers() -> None:
    dead = [f"amqp://guest:hunter22@127.0.0.1:{_dead_port()}/" for _ in range(2)]
    with pytest.raises(errors.BrokerUnavailable, match="no RabbitMQ node answers") as raised:
        await amqp.connect(dead, name="eventfleet test connect", attempt_seconds=2)
    assert all(amqp.endpoint(u) in str(raised.value) for u in dead)
    assert "hunter22" not in str(raised.value)
    # One URL: the outage names RabbitMQ and the node, the driver's error kept as the cause.
    with pytest.raises(errors.BrokerUnavailable, match=rf"^RabbitMQ at {amqp.endpoint(dead[0])} unreachable: ") as one:
        await amqp.connect(dead[:1], name="eventfleet test connect", attempt_seconds=2)
    assert isinstance(one.value.__cause__, OSError)
    assert "hunter22" not in str(one.value)


def test_health_reports_a_block_once_each_way_and_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="workers.runtime.health")
    status = health.Health()
    status.up("postgres")
    status.up("rabbitmq", broker="127.0.0.1:5681")
    assert status.ready()
    assert status.reason() == ""
    assert status.broker == "127.0.0.1:5681"
    status.blocked("low on memory")
    status.blocked("low on memory")
    assert not status.ready()
    assert status.reason() == "rabbitmq: broker blocked publishing: low on memory"
    assert metrics.registry.get_sample_value("eventfleet_relay_blocked") == 1
    status.unblocked()
    status.unblocked()
    assert status.ready()
    assert metrics.registry.get_sample_value("eventfleet_relay_blocked") == 0
    assert [r.getMessage() for r in caplog.records] == ["broker blocked publishing", "broker unblocked"]
    status.blocked("low on disk")
    status.down("rabbitmq", errors.BrokerUnavailable("connection lost"))  # the block goes with its connection
    assert status.blocked_reason is None
    assert status.reason() == "rabbitmq: BrokerUnavailable: connection lost"
    assert metrics.registry.get_sample_value("eventfleet_relay_blocked") == 0

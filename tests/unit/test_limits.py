"""The byte limits: budgets in bytes, and the start-up refusal of limits that cannot all hold."""

from __future__ import annotations

import pytest

from store.errors import ConfigError
from workers import cli
from workers.config import ENVELOPE_BYTES, MIB, Settings
from workers.errors import LimitsConflict


def settings(**env: str) -> Settings:
    return Settings.from_env({f"EVENTFLEET_{k.upper()}": v for k, v in env.items()})


def test_the_defaults_hold() -> None:
    settings().check_limits()


def test_the_largest_message_is_the_max_payload_or_the_message_bytes_with_its_envelope() -> None:
    assert settings(max_payload_bytes=str(4 * MIB)).max_message_bytes == 4 * MIB + ENVELOPE_BYTES
    assert settings(max_payload_bytes="2048", message_bytes="65536").max_message_bytes == 65536 + ENVELOPE_BYTES


def test_a_payload_whose_message_is_over_the_brokers_limit_is_refused_with_a_payload_that_fits() -> None:
    with pytest.raises(LimitsConflict) as refused:
        settings(max_payload_bytes=str(16 * MIB), prefetch_bytes=str(32 * MIB), relay_batch_bytes=str(32 * MIB),
                 read_bytes=str(32 * MIB)).check_limits()

    assert str(refused.value) == (
        f"EVENTFLEET_MAX_PAYLOAD_BYTES={16 * MIB} and EVENTFLEET_MESSAGE_BYTES={MIB} make messages of up to "
        f"{16 * MIB + ENVELOPE_BYTES} bytes, over the broker's EVENTFLEET_BROKER_MAX_MESSAGE_BYTES={16 * MIB}: "
        f"set both to at most {16 * MIB - ENVELOPE_BYTES} (or raise the broker's max_message_size and that "
        f"variable to {16 * MIB + ENVELOPE_BYTES})")


def test_a_bigger_broker_limit_lets_a_bigger_payload_through() -> None:
    settings(max_payload_bytes=str(16 * MIB), broker_max_message_bytes=str(128 * MIB), prefetch_bytes=str(32 * MIB),
             relay_batch_bytes=str(32 * MIB), read_bytes=str(32 * MIB)).check_limits()


def test_a_prefetch_budget_under_one_largest_message_is_refused_with_the_size_that_holds_one() -> None:
    with pytest.raises(LimitsConflict) as refused:
        settings(prefetch_bytes=str(MIB)).check_limits()

    assert str(refused.value) == (f"EVENTFLEET_PREFETCH_BYTES={MIB} cannot hold one message of up to "
                                  f"{MIB + ENVELOPE_BYTES} bytes: set it to at least {MIB + ENVELOPE_BYTES}")


def test_a_relay_budget_under_one_largest_event_is_refused() -> None:
    with pytest.raises(LimitsConflict) as refused:
        settings(relay_batch_bytes="65536").check_limits()

    assert str(refused.value) == (f"EVENTFLEET_RELAY_BATCH_BYTES=65536 cannot hold one event of "
                                  f"EVENTFLEET_MAX_PAYLOAD_BYTES={MIB}: set it to at least {MIB}")


def test_a_read_budget_under_one_largest_event_is_refused() -> None:
    with pytest.raises(LimitsConflict) as refused:
        settings(read_bytes="65536").check_limits()

    assert str(refused.value) == (f"EVENTFLEET_READ_BYTES=65536 cannot hold one event of "
                                  f"EVENTFLEET_MAX_PAYLOAD_BYTES={MIB}: set it to at least {MIB}")


def test_every_conflict_is_named_at_once() -> None:
    with pytest.raises(LimitsConflict) as refused:
        settings(relay_batch_bytes="65536", read_bytes="65536", prefetch_bytes="65536").check_limits()

    assert [p.split("=")[0] for p in str(refused.value).split("; ")] == [
        "EVENTFLEET_PREFETCH_BYTES", "EVENTFLEET_RELAY_BATCH_BYTES", "EVENTFLEET_READ_BYTES"]


def test_a_conflict_is_a_configuration_error() -> None:
    assert issubclass(LimitsConflict, ConfigError)


@pytest.mark.parametrize("command", ["relay", "worker"])
def test_the_relay_and_the_worker_refuse_to_start_with_conflicting_limits(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([command], environ={"EVENTFLEET_READ_BYTES": "65536"})

    assert code == 2
    assert capsys.readouterr().err == (
        f"eventfleet: configuration error: EVENTFLEET_READ_BYTES=65536 cannot hold one event of "
        f"EVENTFLEET_MAX_PAYLOAD_BYTES={MIB}: set it to at least {MIB}\n")


def test_the_prefetch_in_messages_is_bounded_by_the_prefetch_bytes() -> None:
    assert settings(prefetch="500", message_events="100", prefetch_bytes=str(3 * MIB)).prefetch_messages == 2
    assert settings(prefetch="500", message_events="100", prefetch_bytes=str(64 * MIB)).prefetch_messages == 5


def test_the_default_byte_budget_holds_the_default_prefetch_of_five_messages_of_the_largest_size() -> None:
    # Two (a 3 MiB budget) left a partition 2 deliveries in flight: at 500 events/s over 16 partitions, whose
    # messages carry 1-2 events each, a worker fell behind the load (bench.pipeline --latency-only: p99 4.9 s,
    # 0.5 s with 5).
    assert settings().prefetch_messages == 5


def test_a_prefetch_holds_at_least_one_message() -> None:
    assert Settings(prefetch_bytes=1024).prefetch_messages == 1

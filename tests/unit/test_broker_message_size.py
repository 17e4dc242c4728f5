"""Messages stay under the broker's max_message_size (RabbitMQ 4.x: 16 MiB by default): a configuration
whose largest event could not be published is refused at start (``Settings.check_limits``)."""

from __future__ import annotations

from workers.config import BROKER_MAX_MESSAGE_BYTES, Settings

MiB = 1024 * 1024


def test_the_broker_max_message_size_defaults_to_rabbitmq_4s_16_mib() -> None:
    assert Settings().broker_max_message_bytes == BROKER_MAX_MESSAGE_BYTES == 16 * MiB
    assert Settings.from_env({}).broker_max_message_bytes == 16 * MiB
    assert Settings.from_env({"EVENTFLEET_BROKER_MAX_MESSAGE_BYTES": str(128 * MiB)}).broker_max_message_bytes == (
        128 * MiB)


# What a configuration over the broker's limit is refused with: tests/unit/test_limits.py (Settings.check_limits).

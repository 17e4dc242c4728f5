"""Messages stay under the broker's max_message_size (RabbitMQ 4.x: 16 MiB by default): a configuration
whose largest event could not be published is refused at start."""

from __future__ import annotations

import pytest

from store import errors
from workers.config import BROKER_MAX_MESSAGE_BYTES, MESSAGE_ENVELOPE_BYTES, Settings

MiB = 1024 * 1024


def test_the_broker_max_message_size_defaults_to_rabbitmq_4s_16_mib() -> None:
    assert Settings().broker_max_message_bytes == BROKER_MAX_MESSAGE_BYTES == 16 * MiB
    assert Settings.from_env({}).broker_max_message_bytes == 16 * MiB
    assert Settings.from_env({"EVENTFLEET_BROKER_MAX_MESSAGE_BYTES": str(128 * MiB)}).broker_max_message_bytes == (
        128 * MiB)


def test_a_payload_limit_whose_event_would_not_fit_in_a_message_is_refused() -> None:
    with pytest.raises(errors.ConfigError, match=r"^EVENTFLEET_MAX_PAYLOAD_BYTES \(67108864\) with a message's "
                                                 r"envelope \(65536\) is over EVENTFLEET_BROKER_MAX_MESSAGE_BYTES "
                                                 r"\(16777216\): the broker would refuse"):
        Settings.from_env({"EVENTFLEET_MAX_PAYLOAD_BYTES": str(64 * MiB)})


def test_the_largest_payload_that_fits_with_its_envelope_is_accepted() -> None:
    largest = 16 * MiB - MESSAGE_ENVELOPE_BYTES
    assert Settings.from_env({"EVENTFLEET_MAX_PAYLOAD_BYTES": str(largest)}).max_payload_bytes == largest
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_MAX_PAYLOAD_BYTES"):
        Settings.from_env({"EVENTFLEET_MAX_PAYLOAD_BYTES": str(largest + 1)})
    raised = Settings.from_env({"EVENTFLEET_MAX_PAYLOAD_BYTES": str(64 * MiB),
                                "EVENTFLEET_BROKER_MAX_MESSAGE_BYTES": str(128 * MiB)})  # a 3.x broker's default
    assert raised.max_payload_bytes == 64 * MiB


def test_batch_messages_bigger_than_the_broker_takes_are_refused() -> None:
    with pytest.raises(errors.ConfigError, match=r"^EVENTFLEET_MESSAGE_BYTES \(2097152\) is over "
                                                 r"EVENTFLEET_BROKER_MAX_MESSAGE_BYTES \(1048576\)"):
        Settings.from_env({"EVENTFLEET_MESSAGE_BYTES": str(2 * MiB), "EVENTFLEET_MAX_PAYLOAD_BYTES": "1024",
                           "EVENTFLEET_BROKER_MAX_MESSAGE_BYTES": str(MiB)})

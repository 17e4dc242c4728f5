"""The Postgres session limits of workers and relays: what the settings give each role's sessions."""

from __future__ import annotations

from store import db
from workers.config import Settings
from workers.relay import RelayConfig
from workers.runtime import lifecycle


def test_a_workers_idle_and_lock_limits_are_a_third_of_the_lease_by_default() -> None:
    settings = Settings.from_env({"EVENTFLEET_LEASE_SECONDS": "15"})
    assert lifecycle.session_timeouts(settings) == db.Timeouts(idle_in_transaction=5.0, lock=5.0)


def test_the_limits_set_in_the_environment_replace_the_defaults() -> None:
    settings = Settings.from_env({"EVENTFLEET_TRANSACTION_IDLE_SECONDS": "7", "EVENTFLEET_LOCK_TIMEOUT_SECONDS": "2"})
    assert lifecycle.session_timeouts(settings) == db.Timeouts(idle_in_transaction=7.0, lock=2.0)


def test_the_limits_become_startup_parameters_in_milliseconds_and_zero_sets_none() -> None:
    settings = Settings.from_env({"EVENTFLEET_TRANSACTION_IDLE_SECONDS": "0", "EVENTFLEET_LOCK_TIMEOUT_SECONDS": "4"})
    server_settings = db.connect_kwargs("s", "app", lifecycle.session_timeouts(settings))["server_settings"]
    assert server_settings == {"search_path": '"s"', "application_name": "app", "lock_timeout": "4000"}


def test_the_relays_transaction_may_idle_its_confirm_timeout_longer_than_a_workers() -> None:
    settings = Settings.from_env({"EVENTFLEET_LEASE_SECONDS": "15"})
    assert RelayConfig.from_settings(settings).timeouts == db.Timeouts(idle_in_transaction=35.0, lock=5.0)
    assert RelayConfig.from_settings(settings, confirm_timeout=10.0).timeouts.idle_in_transaction == 15.0


def test_one_off_commands_sessions_get_no_limits() -> None:
    assert "lock_timeout" not in db.connect_kwargs("s")["server_settings"]
    assert "idle_in_transaction_session_timeout" not in db.connect_kwargs("s")["server_settings"]

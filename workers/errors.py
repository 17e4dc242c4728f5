"""Every error of the runtime, in one tree under the store's root, ``EventFleetError``.

The class says what the caller should do: ``BrokerUnavailable`` and its kin are retried until the broker is
back; ``MalformedMessage`` is dead-lettered, never retried; ``HandlerFailed`` is retried, then parked per
the projection's policy; the rest end the command with a one-line reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from store.codec import personal
from store.errors import ConfigError, EventFleetError

if TYPE_CHECKING:
    from store.records import RecordedEvent


class LimitsConflict(ConfigError):
    """The configured byte limits cannot all hold (an event or message bigger than a budget or the broker)."""


class WorkerError(EventFleetError):
    """Unexpected worker error."""


class BrokerUnavailable(WorkerError):
    """RabbitMQ could not be reached; retrying may succeed."""


class ChannelLost(BrokerUnavailable):
    """The RabbitMQ channel or connection closed under the consumer; unacked deliveries come back."""


class PublishFailed(WorkerError):
    """The broker nacked or returned a message; the batch will be published again."""


class MalformedMessage(WorkerError):
    """A delivery is not a valid eventfleet message; it is dead-lettered, never retried."""


class HandlerFailed(WorkerError):
    """A projection's handler raised; ``event`` is None when a set-based apply_batch failed as a whole."""

    def __init__(self, projection: str, event: RecordedEvent | None, cause: BaseException) -> None:
        where = f"{event.stream_id}@{event.version} ({event.event_type})" if event else "a set-based batch"
        # The handler's message may quote the event: its personal values never reach a log or a dead letter.
        told = personal.redact(str(cause), event.event) if event else str(cause)
        super().__init__(f"projection {projection}: handler failed on {where}: {type(cause).__name__}: {told}")
        self.event = event


class HeldForNewerCode(WorkerError):
    """An event this projection handles is of a newer version (or type) than this code knows: its partition
    waits, unacked, for a worker of the newer release; nothing is parked."""

    def __init__(self, projection: str, event: RecordedEvent) -> None:
        super().__init__(f"{projection}: {event.stream_id}@{event.version} is {event.event_type}, newer than this "
                         f"code: held for a worker that knows it")
        self.projection = projection
        self.event = event


class NotRetryable(WorkerError):
    """This dead letter cannot be re-driven."""


class NoDeadLetter(NotRetryable):
    """No dead letter has this id."""


class RebuildError(WorkerError):
    """The projection could not be rebuilt."""


class RebuildRunning(RebuildError):
    """Another process is rebuilding this projection right now."""


class ReactorNotRebuildable(RebuildError):
    """``rebuild`` was asked for a reactor: its effects are in the store, not in tables."""


class TeardownRefused(WorkerError):
    """This schema is not a deployment that teardown may drop."""


class RetireRefused(WorkerError):
    """``retire`` would remove a read model still in the code or run by a live worker, or one the deployment
    holds nothing of; nothing was removed."""


class DemoFailed(WorkerError):
    """The demo cannot go on; the message says why."""


class FleetFailed(WorkerError):
    """A process of the fleet exited on its own or was not ready in time; the message names it and its log."""


__all__ = ["BrokerUnavailable", "ChannelLost", "ConfigError", "DemoFailed", "FleetFailed", "HandlerFailed",
           "HeldForNewerCode", "LimitsConflict", "MalformedMessage", "NoDeadLetter", "NotRetryable", "PublishFailed",
           "RebuildError", "RebuildRunning",
           "TeardownRefused", "WorkerError"]

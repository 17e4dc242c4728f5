"""Errors of the runtime; they share the store's root, EventFleetError."""

from __future__ import annotations

from store.errors import ConfigError, EventFleetError


class WorkerError(EventFleetError):
    """Unexpected worker error."""


class BrokerUnavailable(WorkerError):
    """RabbitMQ could not be reached; retrying may succeed."""


class PublishFailed(WorkerError):
    """The broker nacked or returned a message; the batch will be published again."""


class MalformedMessage(WorkerError):
    """A delivery is not a valid eventfleet message; it is dead-lettered, never retried."""


class UnknownProjection(WorkerError):
    """No projection is registered under this name."""


__all__ = ["BrokerUnavailable", "ConfigError", "MalformedMessage", "PublishFailed", "UnknownProjection",
           "WorkerError"]

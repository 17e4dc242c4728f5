"""Readiness of a process's connections, and the retry policy that outlives outages."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import aiormq.exceptions
import pamqp.exceptions
import tenacity

from store import errors as store_errors
from workers import errors

logger = logging.getLogger(__name__)

#: What an outage of Postgres or RabbitMQ looks like from here; anything else is a bug and propagates.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    store_errors.TransientError,
    errors.BrokerUnavailable,
    errors.PublishFailed,
    aiormq.exceptions.AMQPError,
    # A RuntimeError, not an AMQPError: acking (or publishing) on a channel the broker just closed.
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
)


@dataclasses.dataclass
class Health:
    """Whether this process's Postgres and RabbitMQ connections are up; /readyz reports ``ready()``.

    ``down``/``up`` log an outage once when it starts and once when it ends, not on every retry.
    """

    postgres: bool = False
    rabbitmq: bool = False
    _outages: dict[str, str] = dataclasses.field(default_factory=dict)

    def ready(self) -> bool:
        return self.postgres and self.rabbitmq

    def down(self, service: str, cause: BaseException, **extra: Any) -> None:
        """Mark service ('postgres' or 'rabbitmq') unreachable; log the first failure of an outage."""
        setattr(self, service, False)
        if service not in self._outages:
            self._outages[service] = f"{type(cause).__name__}: {cause}"
            logger.warning("outage", extra={"service": service, "cause": self._outages[service], **extra})

    def up(self, service: str, **extra: Any) -> None:
        """Mark service reachable; log the recovery if an outage was under way."""
        setattr(self, service, True)
        if self._outages.pop(service, None) is not None:
            logger.warning("recovered", extra={"service": service, **extra})


def retry_forever(*, max_wait: float = 10.0) -> tenacity.AsyncRetrying:
    """Retry outages with jittered exponential backoff for as long as the process lives."""
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(OUTAGE_ERRORS),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=max_wait),
        stop=tenacity.stop_never,
        reraise=True,
    )

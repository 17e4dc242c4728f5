"""Readiness of a process's connections: what /readyz reports, and outages logged once."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

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

"""Readiness of a process's connections: what /readyz reports, and outages logged once."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from store import errors as store_errors
from workers.runtime import metrics

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class Health:
    """Whether this process's Postgres and RabbitMQ connections are up, and whether the broker lets it publish;
    /readyz reports ``ready()`` (``reason()`` says why not).

    ``down``/``up`` log an outage once when it starts and once when it ends, not on every retry;
    ``blocked``/``unblocked`` likewise log the broker's flow control (``connection.blocked``: a memory or disk
    alarm) once per episode, and set ``eventfleet_relay_blocked``. ``broker`` is the node (``host:port``) of
    the RabbitMQ connection up now, or of the last one: a reconnection tries it last.
    """

    postgres: bool = False
    rabbitmq: bool = False
    broker: str | None = None
    blocked_reason: str | None = None
    _outages: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Partitions held at an event newer than this code ("projection.partition" -> why).
    held: dict[str, str] = dataclasses.field(default_factory=dict)

    def ready(self) -> bool:
        return self.postgres and self.rabbitmq and self.blocked_reason is None and not self.held

    def reason(self) -> str:
        """Why ``ready()`` is false (empty while ready), e.g. ``rabbitmq: broker blocked publishing: low on memory``."""
        why = [f"{service}: {self._outages.get(service, 'not connected yet')}"
               for service in ("postgres", "rabbitmq") if not getattr(self, service)]
        if self.blocked_reason is not None:
            why.append(f"rabbitmq: broker blocked publishing: {self.blocked_reason}")
        why += [f"{key} held: {reason}" for key, reason in sorted(self.held.items())]
        return "; ".join(why)

    def down(self, service: str, cause: BaseException, **extra: Any) -> None:
        """Mark service ('postgres' or 'rabbitmq') unreachable; log the first failure of an outage.

        A transaction Postgres aborted for a conflict (a deadlock, a serialization failure) is no outage:
        it is logged as what it is, each time, and the caller's retry runs it again; readiness stays."""
        if isinstance(cause, store_errors.TransactionConflict):
            logger.warning("transaction conflict, retrying", extra={
                "service": service, "cause": str(cause), **extra})
            return
        setattr(self, service, False)
        if service == "rabbitmq":
            self.unblocked(quiet=True)  # a block belongs to the connection that is gone
        if service not in self._outages:
            self._outages[service] = f"{type(cause).__name__}: {cause}"
            logger.warning("outage", extra={"service": service, "cause": self._outages[service], **extra})

    def up(self, service: str, *, broker: str | None = None, **extra: Any) -> None:
        """Mark service reachable (``broker``: the RabbitMQ node connected to); log the recovery if an outage
        was under way."""
        setattr(self, service, True)
        if broker is not None:
            self.broker = broker
            extra = {"node": broker, **extra}
        if self._outages.pop(service, None) is not None:
            logger.warning("recovered", extra={"service": service, **extra})

    def blocked(self, reason: str) -> None:
        """The broker blocked this process's publishing (``connection.blocked``): not ready until unblocked."""
        if self.blocked_reason is None:
            logger.warning("broker blocked publishing", extra={"reason": reason, "node": self.broker})
        self.blocked_reason = reason
        metrics.RELAY_BLOCKED.set(1)

    def unblocked(self, *, quiet: bool = False) -> None:
        """The block is lifted (``connection.unblocked``), or gone with its connection (``quiet``: not logged)."""
        if self.blocked_reason is not None and not quiet:
            logger.warning("broker unblocked", extra={"node": self.broker})
        if self.blocked_reason is not None:
            metrics.RELAY_BLOCKED.set(0)
        self.blocked_reason = None

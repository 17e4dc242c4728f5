"""The one retry policy: what an outage looks like, and retrying through it for as long as the process lives."""

from __future__ import annotations

import asyncio
import contextlib

import aiormq.exceptions
import pamqp.exceptions
import tenacity

from store import errors as store_errors
from workers import errors

#: What an outage of Postgres or RabbitMQ looks like from here; anything else is a bug and propagates.
#: Postgres errors reach here translated (``store.db.translate_errors``: by SQLSTATE, ``store.sqlstates``),
#: and a handler's own errors as ``HandlerFailed`` (``workers.handlers``), so the bare socket
#: errors below are the broker's (a handler's FileNotFoundError is no outage).
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


def condition_of(exc: BaseException) -> dict[str, str]:
    """Log fields of an outage that is a condition of the database's environment (``EnvironmentFailure``):
    its SQLSTATE, its name and what to fix; none for any other outage."""
    if isinstance(exc, store_errors.EnvironmentFailure):
        return {"sqlstate": exc.sqlstate, "condition": exc.condition, "fix": exc.remedy}
    return {}


def retry_forever(*, max_wait: float = 10.0) -> tenacity.AsyncRetrying:
    """Retry outages with jittered exponential backoff for as long as the process lives."""
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(OUTAGE_ERRORS),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=max_wait),
        stop=tenacity.stop_never,
        reraise=True,
    )


def retry_until(stop: asyncio.Event, *, max_wait: float = 10.0) -> tenacity.AsyncRetrying:
    """``retry_forever`` until ``stop`` is set: the backoff's sleep ends early when it is, and the last
    outage is re-raised (callers that stop on purpose swallow it)."""

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    return retry_forever(max_wait=max_wait).copy(stop=lambda _: stop.is_set(), sleep=sleep)

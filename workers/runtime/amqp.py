"""Connecting to RabbitMQ when it is a cluster: one URL per node, tried in turn, and the broker's flow control.

``EVENTFLEET_AMQP_URL`` may name several nodes, comma-separated (``Settings.amqp_urls``). ``connect`` tries
them one after the other and returns the first connection that opens. Processes spread over the nodes: a
first connection starts at a random node; a reconnection (``after=`` the node of the connection just lost)
starts at a random other node and tries the lost one last, so a process whose node is gone goes elsewhere
first, and the clients of one lost node spread over the rest. Each
attempt is bounded (``attempt_seconds``): a node that accepts TCP but never answers AMQP (half-open, blackholed,
or out of file descriptors) costs that long, then the next node is tried; the failure says which it was
(``timed_out``).

Every connection gets an AMQP heartbeat (``HEARTBEAT`` seconds unless the URL names one, ``?heartbeat=N``),
so a connection whose peer went silent without closing it (a dead host, a dropped route) is detected by the
client after about three missed heartbeats and ends like any lost connection, instead of hanging until
TCP gives up (minutes to hours).

``watch_blocked`` reports the broker's ``connection.blocked`` / ``connection.unblocked`` (a memory or disk
alarm anywhere in the cluster blocks every publishing connection): aio-pika and aiormq have no callback for
them (aio-pika#506), so it wraps aiormq's two frame handlers on that one connection object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractConnection
from yarl import URL

from workers.errors import BrokerUnavailable
from workers.runtime import redact, retry

logger = logging.getLogger(__name__)

#: Seconds of the AMQP heartbeat a URL without ``heartbeat=`` gets (aiormq's own default is 60).
HEARTBEAT = 10
#: Seconds one node gets to open a connection (TCP, AMQP handshake, ``connection.open``).
CONNECT_TIMEOUT = 10.0
#: Seconds a node that timed out gets to accept a plain TCP connection, to tell why it timed out.
TCP_PROBE_SECONDS = 2.0

# aiormq's handlers of the two frames (private: name-mangled methods of aiormq.connection.Connection).
_BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
_UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"


def endpoint(url: str | URL) -> str:
    """``host:port`` of a URL (the default port of its scheme when it names none): how logs name a node."""
    parsed = URL(str(url))
    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    return f"{parsed.host}:{port}"


def connection_endpoint(connection: AbstractConnection) -> str:
    """``host:port`` of the node a connection is open to."""
    url: URL = connection.url  # type: ignore[attr-defined]  # aio_pika.Connection's; not on the abstract class
    return endpoint(url)


def with_heartbeat(url: str, heartbeat: int = HEARTBEAT) -> str:
    """``url`` with ``heartbeat=`` in its query unless it already has one."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=str(heartbeat)))


def order(urls: Sequence[str], after: str | None = None, *, rng: random.Random | None = None) -> list[str]:
    """The URLs in the order to try them, each once, wrapping around from a random one; when ``after`` (an
    ``endpoint``: the node of the connection just lost) is one of them, from a random other one, and ``after``
    last. Random, not the next in the list: the clients of a lost node spread over the others instead of all
    landing on one, and a rolling restart in list order does not find the same client on every node it stops."""
    if not urls:
        raise ValueError("no RabbitMQ URL to connect to")
    rng = rng or random.Random()
    endpoints = [endpoint(u) for u in urls]
    lost = endpoints.index(after) if after is not None and after in endpoints else None
    starts = [i for i in range(len(urls)) if i != lost] or [0]
    start = rng.choice(starts)
    ring = [(start + i) % len(urls) for i in range(len(urls))]
    return [urls[i] for i in ring if i != lost] + ([urls[lost]] if lost is not None else [])


async def connect(urls: Sequence[str], *, name: str, after: str | None = None,
                  attempt_seconds: float = CONNECT_TIMEOUT, heartbeat: int = HEARTBEAT) -> AbstractConnection:
    """The first node of ``urls`` (see ``order``) that opens a connection named ``name``, not robust (the
    caller owns reconnection). Raises ``BrokerUnavailable`` naming each node (``RabbitMQ at host:port
    unreachable: <cause>`` when there is one) and its failure, never a password: an outage
    (``retry.OUTAGE_ERRORS``), its ``__cause__`` the last node's failure. A node that timed out is named by
    ``timed_out``, which says whether it accepted TCP."""
    tried = order(urls, after)
    failures: list[str] = []
    last: BaseException | None = None
    for url in tried:
        try:
            return await aio_pika.connect(with_heartbeat(url, heartbeat), timeout=attempt_seconds,
                                          client_properties={"connection_name": name})
        except retry.OUTAGE_ERRORS as exc:
            # A timeout says nothing by itself: find out whether the node took the TCP connection at all.
            silent = await timed_out(url, attempt_seconds) if isinstance(exc, TimeoutError) else None
            if len(tried) == 1 and silent is not None:
                raise silent from exc
            last = silent or exc
            failures.append(str(silent) if silent else f"{endpoint(url)}: {type(exc).__name__}: "
                            f"{redact.text(str(exc), redact.secrets_of(url)) or 'timed out'}")
            logger.debug("RabbitMQ node does not answer, trying the next", extra={"node": endpoint(url),
                                                                                 "error": failures[-1]})
    if len(tried) == 1:  # the driver's error names neither RabbitMQ nor the node: say both, and what failed
        refused = isinstance(last, (aiormq.exceptions.AuthenticationError,
                                    aiormq.exceptions.ProbableAuthenticationError))
        what = " refused the login (check the user and password of EVENTFLEET_AMQP_URL): " if refused else \
            " unreachable: "
        raise BrokerUnavailable(f"RabbitMQ at {failures[0].replace(': ', what, 1)}") from last
    raise BrokerUnavailable(f"no RabbitMQ node answers ({'; '.join(failures)})") from last


async def timed_out(url: str, seconds: float) -> BrokerUnavailable:
    """Why a connection attempt to ``url`` timed out after ``seconds``: the node accepted TCP and did not answer
    the AMQP handshake (a node out of file descriptors does that: docs/reference.md, "RabbitMQ versions and the
    broker's limits"), or it did not accept TCP at all. Asked again with a plain TCP connection (closed at once)."""
    node = endpoint(url)
    host, _, port = node.rpartition(":")
    try:
        async with asyncio.timeout(min(seconds, TCP_PROBE_SECONDS)):
            _, writer = await asyncio.open_connection(host, int(port))
    except (OSError, TimeoutError):
        return BrokerUnavailable(f"RabbitMQ at {node} did not accept a TCP connection within {seconds:g} s")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return BrokerUnavailable(
        f"RabbitMQ at {node} accepted TCP but did not answer the AMQP handshake within {seconds:g} s: file "
        "descriptors/handles exhausted? see docs/reference.md, \"RabbitMQ versions and the broker's limits\"")


def watch_blocked(connection: AbstractConnection, blocked: Callable[[str], None],
                  unblocked: Callable[[], None]) -> bool:
    """Call ``blocked(reason)`` when the broker blocks this connection's publishing (``connection.blocked``,
    the reason as the broker gives it, e.g. ``low on memory``) and ``unblocked()`` when it lifts the block.

    Returns False, and logs a warning, when this aiormq has not the handlers to wrap (the frames are then
    handled by aiormq alone, as before: publishing waits, confirms time out)."""
    raw = getattr(getattr(connection, "transport", None), "connection", None)
    original_blocked = getattr(raw, _BLOCKED_HANDLER, None)
    original_unblocked = getattr(raw, _UNBLOCKED_HANDLER, None)
    if raw is None or original_blocked is None or original_unblocked is None:
        logger.warning("cannot watch connection.blocked on this aiormq: a blocked broker shows as confirm timeouts")
        return False

    def wrap(original: Callable[[Any], Awaitable[None]], then: Callable[[Any], None]
             ) -> Callable[[Any], Awaitable[None]]:
        async def handler(frame: Any) -> None:
            await original(frame)
            then(frame)
        return handler

    setattr(raw, _BLOCKED_HANDLER, wrap(original_blocked, lambda frame: blocked(str(frame.reason or "unknown"))))
    setattr(raw, _UNBLOCKED_HANDLER, wrap(original_unblocked, lambda _: unblocked()))
    return True

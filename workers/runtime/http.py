"""The HTTP server of long-running commands: /metrics, /healthz and /readyz (aiohttp, same event loop).

A blocked event loop cannot answer for itself, so a watchdog thread watches a heartbeat the loop keeps
beating. While the beat is older than ``stall_after`` the thread takes the requests queued on the same
listening socket and answers them with the standard library's ``http.server`` (503 and how long the loop
has been blocked, for /healthz, /readyz and /metrics alike; 404 elsewhere); once the loop beats again
aiohttp serves everything as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

import prometheus_client
from aiohttp import web

from store.errors import ConfigError
from workers.runtime import metrics, redact

logger = logging.getLogger(__name__)

Check = Callable[[], bool]

DEFAULT_STALL_AFTER = 5.0
#: Seconds a stopping server waits for requests in flight and open connections before it closes them.
SHUTDOWN_SECONDS = 3.0
ENDPOINTS = ("/metrics", "/healthz", "/readyz")


class Watchdog:
    """A heartbeat beaten by the event loop and watched from a thread."""

    def __init__(self, stall_after: float = DEFAULT_STALL_AFTER) -> None:
        self.stall_after = stall_after
        self.interval = min(0.5, stall_after / 4)
        self._beat = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Beat every ``interval`` seconds on loop until stop()."""

        def beat() -> None:
            self._beat = time.monotonic()
            self._timer = loop.call_later(self.interval, beat)

        beat()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def blocked_for(self) -> float:
        """Seconds since the loop last beat, or 0 while it beats on time."""
        age = time.monotonic() - self._beat
        return age if age > self.stall_after else 0.0


def make_app(ready: Check, watchdog: Watchdog | None = None,
             reason: Callable[[], str] | None = None) -> web.Application:
    """The aiohttp application; ``ready`` says whether Postgres and RabbitMQ are reachable now, ``reason``
    why not (``/readyz`` says it, passwords masked)."""

    async def metrics_view(request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        # Running here means the loop runs again, but a stale beat says it was stuck until a moment ago.
        blocked = watchdog.blocked_for() if watchdog else 0.0
        if blocked:
            return web.Response(status=503, text=f"event loop blocked for {blocked:.1f}s\n")
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        why = redact.text(reason()) if reason is not None else ""
        return web.Response(status=503, text=f"not ready: {why}\n" if why else "not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class _StalledHandler(http.server.BaseHTTPRequestHandler):
    """One request on the watchdog thread while the loop is blocked: 503 and why for every endpoint."""

    server: _StalledServer
    timeout = 1.0  # a client that connects and sends nothing must not hold the watchdog for long
    server_version = "eventfleet-watchdog"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if urllib.parse.urlsplit(self.path).path not in ENDPOINTS:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        text = f"event loop blocked for {self.server.blocked:.1f}s\n".encode()
        self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if body:
            self.wfile.write(text)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("answered while the event loop is blocked", extra={"request": format % args})


class _StalledServer(http.server.HTTPServer):
    """The standard library's HTTP server on a duplicate of aiohttp's listening socket.

    It never binds or listens itself; ``handle_request()`` takes one connection queued on the shared
    socket, if any arrives within ``watchdog.interval``, and answers it with ``_StalledHandler``.
    """

    def __init__(self, listener: socket.socket, watchdog: Watchdog) -> None:
        super().__init__(listener.getsockname()[:2], _StalledHandler, bind_and_activate=False)
        self.socket.close()  # the unbound socket TCPServer made: the shared listener replaces it
        # A timeout, not blocking mode: the file status flags (O_NONBLOCK) are shared with aiohttp's socket,
        # which must stay non-blocking; the timeout also bounds accept() when the loop took the connection.
        listener.settimeout(watchdog.interval)
        self.socket = listener
        self.timeout = watchdog.interval
        self.watchdog = watchdog
        self.blocked = 0.0  # seconds the loop had been blocked when the watchdog last looked

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A probe that hung up or sent garbage costs only its own answer.
        logger.debug("answering a request while the event loop is blocked failed",
                     exc_info=True)  # noqa: LOG014 - socketserver calls this from its except block


def _watch(server: _StalledServer, stop: threading.Event) -> None:
    """The watchdog thread: while the loop is blocked, answer the queued requests with 503."""
    watchdog, stalled = server.watchdog, 0.0
    while not stop.is_set():
        blocked = watchdog.blocked_for()
        if not blocked:
            if stalled:
                logger.warning("event loop recovered", extra={"blocked_seconds": round(stalled, 3)})
                stalled = 0.0
            stop.wait(watchdog.interval)
            continue
        if not stalled:
            logger.warning("event loop blocked", extra={"blocked_seconds": round(blocked, 3)})
        stalled = server.blocked = blocked
        # Waits up to interval for a connection; the loop, just back, may accept it first (then this returns).
        server.handle_request()


def _bind(host: str, port: int, next_free: int) -> socket.socket:
    """A listening socket on ``port``, or on the first free one of the next ``next_free`` ports (logged)."""
    for candidate in range(port, min(port + next_free, 65535) + 1):
        try:
            sock = socket.create_server((host, candidate), backlog=128)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        if candidate != port:
            logger.warning("http port in use: serving on the next free port", extra={"taken": port,
                                                                                   "port": candidate})
        return sock
    taken = (f"HTTP port {port} is already in use (another eventfleet process?)" if not next_free else
             f"HTTP ports {port} to {port + next_free} are all in use (other eventfleet processes?)")
    raise ConfigError(f"{taken}: set EVENTFLEET_HTTP_PORT to a free port, or 0 to turn the HTTP server off")


@contextlib.asynccontextmanager
async def serve(port: int, ready: Check, host: str = "0.0.0.0", *,
                stall_after: float = DEFAULT_STALL_AFTER, reason: Callable[[], str] | None = None,
                next_free: int = 0) -> AsyncIterator[int]:
    """Serve the endpoints on port (0 = off) until exit; yields the bound port (0 when off).

    ``next_free``: when ``port`` is taken, the first free one of the next ``next_free`` ports is used instead,
    and logged (a role's default port, so that several processes on one host start without configuration;
    a port set explicitly is meant to be scraped there and fails instead).
    /healthz turns 503 once the loop has not run for ``stall_after`` seconds (see Watchdog).
    """
    if port == 0:
        yield 0
        return
    sock = _bind(host, port, next_free)
    port = sock.getsockname()[1]
    sock.setblocking(False)
    watchdog = Watchdog(stall_after)
    # A stop waits this long at most for requests in flight and open connections (aiohttp's default, 60 s, is
    # longer than the process's own stop bound: a scrape left open would hold SIGTERM's exit for a minute).
    runner = web.AppRunner(make_app(ready, watchdog, reason), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    stop = threading.Event()
    fallback = _StalledServer(sock.dup(), watchdog)
    thread = threading.Thread(target=_watch, args=(fallback, stop), name="eventfleet-watchdog", daemon=True)
    try:
        await web.SockSite(runner, sock).start()
        watchdog.start(asyncio.get_running_loop())
        thread.start()
        logger.info("http server listening", extra={"port": port})
        yield port
    finally:
        watchdog.stop()
        stop.set()
        if thread.is_alive():
            await asyncio.to_thread(thread.join)
        fallback.server_close()
        await runner.cleanup()
        sock.close()

"""The HTTP server of long-running commands: /metrics, /healthz and /readyz (aiohttp, same event loop).

A blocked event loop cannot answer for itself, so a watchdog thread watches a heartbeat the loop keeps
beating. While the beat is older than ``stall_after`` the thread accepts the probes queued on the same
listening socket and answers them 503; once the loop beats again aiohttp serves everything as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable

import prometheus_client
from aiohttp import web

from workers import metrics

logger = logging.getLogger(__name__)

Check = Callable[[], bool]

DEFAULT_STALL_AFTER = 5.0


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


def make_app(ready: Check, watchdog: Watchdog | None = None) -> web.Application:
    """The aiohttp application; ``ready`` says whether Postgres and RabbitMQ are reachable now."""

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
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _answer_blocked(conn: socket.socket, blocked: float) -> None:
    """Answer one HTTP request with 503 without the event loop's help."""
    conn.settimeout(1.0)
    with contextlib.suppress(OSError):
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            request += chunk
        body = f"event loop blocked for {blocked:.1f}s\n".encode()
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    conn.close()


def _watch(listener: socket.socket, watchdog: Watchdog, stop: threading.Event) -> None:
    """The watchdog thread: while the loop is blocked, answer the queued probes with 503."""
    stalled = 0.0
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
        stalled = blocked
        readable, _, _ = select.select([listener], [], [], watchdog.interval)
        if not readable:
            continue
        try:
            # Non-blocking (asyncio set it): the loop, just back, may have taken this connection first.
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        _answer_blocked(conn, blocked)


@contextlib.asynccontextmanager
async def serve(port: int, ready: Check, host: str = "0.0.0.0", *,
                stall_after: float = DEFAULT_STALL_AFTER) -> AsyncIterator[int]:
    """Serve the endpoints on port (0 = off) until exit; yields the bound port (0 when off).

    /healthz turns 503 once the loop has not run for ``stall_after`` seconds (see Watchdog).
    """
    if port == 0:
        yield 0
        return
    sock = socket.create_server((host, port), backlog=128)
    sock.setblocking(False)
    watchdog = Watchdog(stall_after)
    runner = web.AppRunner(make_app(ready, watchdog), access_log=None, handle_signals=False)
    await runner.setup()
    stop = threading.Event()
    listener = sock.dup()
    thread = threading.Thread(target=_watch, args=(listener, watchdog, stop), name="eventfleet-watchdog",
                              daemon=True)
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
        listener.close()
        await runner.cleanup()
        sock.close()

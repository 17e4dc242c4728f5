"""The HTTP server of long-running commands: /metrics, /healthz and /readyz (aiohttp, same event loop)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import prometheus_client
from aiohttp import web

from workers import metrics

logger = logging.getLogger(__name__)

Check = Callable[[], bool]


def make_app(ready: Check) -> web.Application:
    """The aiohttp application; ``ready`` says whether Postgres and RabbitMQ are reachable now."""

    async def metrics_view(request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
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


@contextlib.asynccontextmanager
async def serve(port: int, ready: Check, host: str = "0.0.0.0") -> AsyncIterator[int]:
    """Serve the endpoints on port (0 = off) until exit; yields the bound port (0 when off)."""
    if port == 0:
        yield 0
        return
    runner = web.AppRunner(make_app(ready), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("http server listening", extra={"port": port})
    try:
        yield port
    finally:
        await runner.cleanup()

"""A running relay's /readyz over real HTTP: 503 while its RabbitMQ is cut off, 200 after; JSON log lines.

The outage is private to the relay under test: it reaches RabbitMQ through a TCP forwarder this test can
cut, so nobody else sharing the broker is disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATABASE_URL
from tests.integration.test_http import free_port, get
from tests.integration.test_relay_helpers import topology_names
from workers.runtime import logs

pytestmark = pytest.mark.slow

RABBITMQ = ("127.0.0.1", 5672)


class Forwarder:
    """A TCP forwarder to RabbitMQ; ``cut()`` drops every connection and refuses new ones until ``restore()``."""

    def __init__(self) -> None:
        self.down = False
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*RABBITMQ)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self) -> None:
        self.down = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def start_relay(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "workers", "relay"], env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it has not exited after 30 s; the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


async def poll(port: int, path: str, status: int, proc: subprocess.Popen[Any], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, "the relay exited"
        with contextlib.suppress(OSError):
            if (await get(port, path))[0] == status:
                return
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        await asyncio.sleep(0.05)


async def test_relay_readyz_flips_during_a_rabbitmq_outage_and_logs_json(schema, prefix, delete_prefixed,
                                                                         tmp_path: Path):
    delete_prefixed(*topology_names(prefix))  # what the relay declares: every loaded projection's queues
    forwarder = Forwarder()
    await forwarder.start()
    http_port = free_port()
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_SCHEMA": schema,
           "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": str(http_port), "EVENTFLEET_LOG_FORMAT": "json",
           "EVENTFLEET_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{forwarder.port}/"}
    log = tmp_path / "relay.log"
    proc = start_relay(env, log)
    try:
        await poll(http_port, "/readyz", 200, proc)
        status, body = await get(http_port, "/metrics")
        assert status == 200
        assert "eventfleet_relay_published_total" in body
        assert (await get(http_port, "/healthz"))[0] == 200
        forwarder.cut()
        await poll(http_port, "/readyz", 503, proc)
        assert (await get(http_port, "/healthz"))[0] == 200, "an outage is not a stuck loop"
        forwarder.restore()
        await poll(http_port, "/readyz", 200, proc)
    finally:
        returncode = stop(proc)
        await forwarder.close()
    assert returncode == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    messages = [(line["message"], line.get("service")) for line in lines]
    assert ("outage", "rabbitmq") in messages
    assert ("recovered", "rabbitmq") in messages
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_json_lines_name_the_projection_stream_and_version():
    record = logging.LogRecord("workers.x", logging.WARNING, __file__, 1, "parking poison event", None, None)
    record.projection, record.stream_id, record.version = "order_summary", "order-1", 3
    doc = json.loads(logs.JsonFormatter().format(record))
    assert (doc["projection"], doc["stream"], doc["version"]) == ("order_summary", "order-1", 3)
    assert "stream_id" not in doc
    assert doc["level"] == "warning"

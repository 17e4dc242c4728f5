"""A broker that accepts TCP and never answers the AMQP handshake (what a RabbitMQ node out of file
descriptors does): connecting says so, and so do the relay's /readyz and ``eventfleet status``.

The broker is a plain TCP server on a free loopback port that accepts connections and never writes: the
failure mode, not an imitation of RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import DATABASE_URL
from tests.integration.conftest import RunCli
from tests.integration.test_http import free_port, get
from tests.integration.test_http_outage import start_relay, stop
from tests.integration.test_status import status
from workers.errors import BrokerUnavailable
from workers.runtime import amqp

pytestmark = [
    pytest.mark.slow,
    # A connect to a broker that never accepts is cancelled by its timeout mid-connect; asyncio leaves that
    # socket to the garbage collector (an "unclosed transport" ResourceWarning whenever it runs: in some later
    # test's setup, which then errors). Collected at the end of each test here, and not counted against it.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def collect_cancelled_connects() -> Iterator[None]:
    yield
    gc.collect()

SILENT = "accepted TCP but did not answer the AMQP handshake within"


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[int]:
    """A TCP server on a free loopback port that accepts every connection, reads and never answers; its port."""
    held: set[asyncio.StreamWriter] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.add(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connecting_to_a_broker_that_never_answers_the_handshake_says_so() -> None:
    async with silent_broker() as port:
        with pytest.raises(BrokerUnavailable) as raised:
            await amqp.connect([f"amqp://guest:hunter22@127.0.0.1:{port}/"], name="eventfleet test", attempt_seconds=1)
    assert str(raised.value).startswith(f"RabbitMQ at 127.0.0.1:{port} {SILENT} 1 s: file descriptors/handles "
                                        "exhausted? see docs/reference.md")
    assert "hunter22" not in str(raised.value)


async def test_a_node_that_never_answers_is_named_among_the_nodes_tried() -> None:
    async with silent_broker() as port:
        with pytest.raises(BrokerUnavailable, match="no RabbitMQ node answers") as raised:
            await amqp.connect([f"amqp://guest:hunter22@127.0.0.1:{port}/", f"amqp://u:p@127.0.0.1:{free_port()}/"],
                               name="eventfleet test", attempt_seconds=1)
    assert f"RabbitMQ at 127.0.0.1:{port} {SILENT} 1 s" in str(raised.value)


async def test_status_says_the_broker_accepted_tcp_but_never_answered(schema: str, prefix: str) -> None:
    async with silent_broker() as port:
        result = await status(schema, prefix, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
    assert result.returncode == 0, result.stderr
    assert f"eventfleet status: RabbitMQ at 127.0.0.1:{port} {SILENT} 5 s: " in result.stderr
    assert result.stderr.rstrip().endswith("(queue depths unknown)")


async def test_relay_readyz_says_the_broker_accepted_tcp_but_never_answered(schema: str, prefix: str,
                                                                            tmp_path: Path) -> None:
    http_port = free_port()
    async with silent_broker() as port:
        env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_SCHEMA": schema,
               "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": str(http_port),
               "EVENTFLEET_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/"}
        proc = start_relay(env, tmp_path / "relay.log")
        try:
            answer = (0, "")
            async with asyncio.timeout(60):  # the first attempt gives up after amqp.CONNECT_TIMEOUT
                while SILENT not in answer[1]:
                    assert proc.poll() is None, "the relay exited"
                    with contextlib.suppress(OSError):
                        answer = await get(http_port, "/readyz")
                    await asyncio.sleep(0.1)
        finally:
            stop(proc)
    assert answer[0] == 503
    assert (f"rabbitmq: BrokerUnavailable: RabbitMQ at 127.0.0.1:{port} {SILENT} 10 s: file descriptors/handles "
            "exhausted? see docs/reference.md, \"RabbitMQ versions and the broker's limits\"\n") in answer[1]


async def test_teardown_says_the_broker_accepted_tcp_but_never_answered_and_drops_nothing(
        schema: str, prefix: str, run_cli: RunCli) -> None:
    async with silent_broker() as port:
        ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix,
                            amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
    assert ran.code == 1
    assert ran.err == (f"eventfleet teardown: RabbitMQ at 127.0.0.1:{port} {SILENT} 5 s: file "
                       "descriptors/handles exhausted? see docs/reference.md, \"RabbitMQ versions and the broker's "
                       "limits\"; nothing dropped\n")

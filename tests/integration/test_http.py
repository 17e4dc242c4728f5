"""The HTTP endpoints over real HTTP: /metrics, /readyz following its check, /healthz and the watchdog."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from store.errors import ConfigError
from workers.config import Settings
from workers.runtime import health, http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def poll(port: int, path: str, status: int, within: float = 30) -> tuple[int, str]:
    """GET path until it answers status or the deadline passes; return the last answer."""
    deadline = time.monotonic() + within
    while True:
        result = await get(port, path)
        if result[0] == status or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_metrics_healthz_and_readyz_follow_the_check():
    up = {"ready": False}
    async with http.serve(free_port(), lambda: up["ready"], host="127.0.0.1") as port:
        status, body = await get(port, "/metrics")
        assert status == 200
        assert "eventfleet_outbox_pending" in body
        assert "eventfleet_end_to_end_seconds_bucket" in body or "eventfleet_end_to_end_seconds" in body
        assert await get(port, "/healthz") == (200, "ok\n")
        assert (await get(port, "/readyz"))[0] == 503
        up["ready"] = True
        assert (await get(port, "/readyz"))[0] == 200


async def test_readyz_says_why_it_is_not_ready_with_passwords_masked():
    health_ = health.Health(postgres=True, rabbitmq=True)
    health_.blocked_reason = "low on memory"
    async with http.serve(free_port(), health_.ready, host="127.0.0.1", reason=health_.reason) as port:
        assert await get(port, "/readyz") == (503, "not ready: rabbitmq: broker blocked publishing: low on memory\n")
        health_.blocked_reason = None
        health_.down("postgres", ConnectionError("postgresql://app:s3cret@db/x refused"))
        status, body = await get(port, "/readyz")
        assert (status, "s3cret" in body, body.startswith("not ready: postgres: ConnectionError")) == (503, False, True)


async def test_port_zero_serves_nothing():
    async with http.serve(0, lambda: True) as port:
        assert port == 0


async def test_healthz_is_503_while_the_loop_is_blocked_and_200_after(caplog):
    seen: list[tuple[int, str]] = []
    release = threading.Event()

    def probe_until_503(port: int) -> None:
        # Runs in its own thread with its own loop, while the test's loop is deliberately blocked.
        async def probe() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                result = await get(port, "/healthz")
                seen.append(result)
                if result[0] == 503:
                    return
        try:
            asyncio.run(probe())
        finally:
            release.set()

    async with http.serve(free_port(), lambda: True, host="127.0.0.1", stall_after=0.3) as port:
        assert (await get(port, "/healthz"))[0] == 200
        prober = threading.Thread(target=probe_until_503, args=(port,))
        prober.start()
        release.wait(timeout=60)  # blocks the event loop until the prober saw the 503
        prober.join()
        assert seen[-1][0] == 503
        assert "event loop blocked" in seen[-1][1]
        assert await poll(port, "/healthz", 200) == (200, "ok\n")
    assert "event loop blocked" in caplog.text


Ask = Callable[[int], Awaitable[list[tuple[int, str]]]]


def gets(*paths: str) -> Ask:
    async def ask(port: int) -> list[tuple[int, str]]:
        return [await get(port, path) for path in paths]
    return ask


def probe_while_blocked(port: int, ask: Ask, release: threading.Event) -> list[tuple[int, str]]:
    """In a thread with its own loop: GET /healthz until the watchdog answers 503, then ``ask`` (the test's
    loop is still blocked, waiting for ``release``); release it; return what ``ask`` got."""
    answers: list[tuple[int, str]] = []

    async def probe() -> None:
        deadline = time.monotonic() + 30
        while (await get(port, "/healthz"))[0] != 503:
            assert time.monotonic() < deadline, "the watchdog never answered 503"
        answers.extend(await ask(port))

    try:
        asyncio.run(probe())
    finally:
        release.set()
    return answers


async def answers_while_blocked(port: int, ask: Ask) -> list[tuple[int, str]]:
    """Block the test's event loop until a prober thread has asked the watchdog."""
    release = threading.Event()
    answers: list[tuple[int, str]] = []
    prober = threading.Thread(target=lambda: answers.extend(probe_while_blocked(port, ask, release)))
    prober.start()
    release.wait(timeout=60)  # blocks the event loop
    prober.join()
    return answers


async def test_readyz_is_503_while_the_loop_is_blocked_and_200_after():
    async with http.serve(free_port(), lambda: True, host="127.0.0.1", stall_after=0.3) as port:
        [(status, body)] = await answers_while_blocked(port, gets("/readyz"))
        assert status == 503
        assert body.startswith("event loop blocked for ")
        assert await poll(port, "/readyz", 200) == (200, "ready\n")


async def test_metrics_is_503_and_an_unknown_path_404_while_the_loop_is_blocked():
    async with http.serve(free_port(), lambda: True, host="127.0.0.1", stall_after=0.3) as port:
        answers = await answers_while_blocked(port, gets("/metrics", "/nothing-here"))
        assert [status for status, _ in answers] == [503, 404]
        assert answers[0][1].startswith("event loop blocked for ")


async def test_a_malformed_request_while_the_loop_is_blocked_gets_400_and_the_watchdog_answers_on():
    async def garbage_then_healthz(port: int) -> list[tuple[int, str]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz junk HTTP/1.1\r\n\r\n")  # a request line of four words
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return [(int(status_line.split()[1]), status_line.decode()), await get(port, "/healthz")]

    async with http.serve(free_port(), lambda: True, host="127.0.0.1", stall_after=0.3) as port:
        answers = await answers_while_blocked(port, garbage_then_healthz)
        assert [status for status, _ in answers] == [400, 503]


async def test_a_taken_default_port_moves_to_the_next_free_one_and_logs_it(caplog):
    with socket.socket() as taken:  # another process on this host holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        caplog.set_level("WARNING", logger="workers.runtime.http")
        async with http.serve(busy, lambda: True, host="127.0.0.1", next_free=20) as port:
            assert busy < port <= busy + 20
            assert (await get(port, "/readyz"))[0] == 200
    assert [(r.getMessage(), r.taken, r.port) for r in caplog.records] == [
        ("http port in use: serving on the next free port", busy, port)]


async def test_a_taken_port_set_explicitly_is_an_error_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        settings = Settings(http_port=busy)
        with pytest.raises(ConfigError, match=rf"^HTTP port {busy} is already in use"):
            async with http.serve(settings.port("worker"), lambda: True, host="127.0.0.1",
                                  next_free=settings.free_ports):
                pass
    assert Settings().free_ports == 20  # unset: the role's default, which may move

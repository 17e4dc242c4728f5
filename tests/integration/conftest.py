"""``run_cli``: the command line in-process, through ``workers.cli.main`` with a deployment's environment."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping

import pytest

from tests.conftest import AMQP_URL, DATABASE_URL
from workers import cli
from workers.runtime import logs, tuning


@dataclasses.dataclass(frozen=True, slots=True)
class Ran:
    """A finished command: its exit status and what it printed."""

    code: int
    out: str
    err: str


RunCli = Callable[..., Awaitable[Ran]]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> RunCli:
    """Run ``eventfleet ARGS...`` against the deployment named by ``schema=`` and ``prefix=`` (``env=``: more
    variables).

    ``main`` runs its own event loop, so it runs in a thread; the test process keeps its logging and its
    garbage collector (``main`` would reconfigure both for a long-running command).
    """
    monkeypatch.setattr(tuning, "tune_gc", lambda: None)
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)

    async def run(*argv: str, schema: str, prefix: str, amqp_url: str = AMQP_URL,
                  env: Mapping[str, str] | None = None) -> Ran:
        environ = {"EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": amqp_url,
                   "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, **(env or {})}
        capsys.readouterr()  # only this command's output
        code = await asyncio.to_thread(cli.main, list(argv), environ)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run

"""The collector's settings of long-running commands: fewer young collections, the start-up heap frozen."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from workers import cli
from workers.config import Settings
from workers.runtime import logs, tuning

ROOT = Path(__file__).resolve().parents[2]


def test_tune_gc_raises_the_thresholds_and_freezes_the_start_up_heap() -> None:
    probe = "import gc; from workers.runtime import tuning; tuning.tune_gc(); print(gc.get_threshold(), gc.get_freeze_count() > 0)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"{tuning.GC_THRESHOLDS} True"


async def _noop(settings: Settings, args: argparse.Namespace) -> int:
    return 0


def test_every_command_runs_with_the_tuned_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(tuning, "tune_gc", lambda: calls.append("tune_gc"))
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)  # keep the test process's logging
    monkeypatch.setitem(cli._COMMANDS, "worker", f"{__name__}:_noop")

    code = cli.main(["worker"], environ={"EVENTFLEET_DATABASE_URL": "postgresql://u@h/db",
                                         "EVENTFLEET_AMQP_URL": "amqp://u@h/"})

    assert (code, calls) == (0, ["tune_gc"])

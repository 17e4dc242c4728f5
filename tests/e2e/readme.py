"""Reading the README as the e2e tests run it: a section's fenced blocks, and its shell commands executed as a
user would type them (background ones with ``&`` kept running until the end, then stopped with SIGTERM)."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def section(title: str) -> str:
    """The README's section under ``## title``, up to the next one."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def blocks(text: str, kind: str) -> list[tuple[str, str]]:
    """(info string, body) of the fenced blocks of ``text`` whose language is ``kind``."""
    return [(m[1].strip(), m[2]) for m in
            re.finditer(rf"^```{kind}([^\n]*)\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)]


@dataclasses.dataclass(frozen=True, slots=True)
class Ran:
    """What the commands printed (the last ``python`` one's stdout), and the background ones' exit statuses and
    logs (stderr), in the order they were started."""

    output: str
    codes: list[int | None]
    logs: list[str]


def run_commands(shell: str, env: dict[str, str], cwd: Path) -> Ran:
    """Run a shell block's commands one by one in ``cwd``: ``export`` sets ``env``, ``pip install`` is skipped
    (the suite runs installed), a trailing ``&`` starts a background process, ``python ...`` runs with this
    interpreter; every foreground command must exit 0."""
    background: list[subprocess.Popen[str]] = []
    output = ""
    try:
        for line in shell.splitlines():
            command = line.split("#")[0].strip()
            if command.startswith("python -m pip install"):
                continue
            if command.startswith("export "):
                key, _, value = command.removeprefix("export ").partition("=")
                env[key] = value
            elif command.endswith("&"):
                with (cwd / f"{len(background)}.log").open("w") as log:
                    background.append(subprocess.Popen(command.rstrip("&").split(), env=env, cwd=cwd, text=True,
                                                       stdout=subprocess.DEVNULL, stderr=log))
            elif command.startswith("python "):
                done = subprocess.run([sys.executable, *command.split()[1:]], env=env, cwd=cwd,
                                      capture_output=True, text=True, timeout=120, check=False)
                assert done.returncode == 0, done.stderr
                output = done.stdout
            elif command:
                done = subprocess.run(command.split(), env=env, cwd=cwd, capture_output=True, text=True,
                                      timeout=120, check=False)
                assert done.returncode == 0, done.stderr
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in background:
            proc.wait(max(1.0, deadline - time.monotonic()))
    return Ran(output, [p.returncode for p in background],
               [(cwd / f"{i}.log").read_text() for i in range(len(background))])

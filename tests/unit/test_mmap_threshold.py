"""The pinned mmap threshold: big blocks keep their own mappings after a bigger one was freed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

# A fresh process: frees a 1 MiB mapped block (which makes glibc raise its threshold unless pinned), then
# holds a 256 KiB block, the size of asyncio's socket reads, and prints whether that one got a mapping.
_PROBE = """
import ctypes, sys
from workers import runtime
from workers.runtime import tuning

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
pinned = tuning.pin_mmap_threshold() if sys.argv[1] == "pin" else False
freed = bytearray(1024 * 1024)
del freed
before = libc.mallinfo2().hblkhd
held = bytearray(256 * 1024)
print(pinned, libc.mallinfo2().hblkhd - before >= 256 * 1024)
"""


def _probe(mode: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, env=environ | env, capture_output=True,
                          text=True, check=True, timeout=60)
    return done.stdout.strip()


def test_a_block_of_a_socket_read_keeps_its_own_mapping_once_pinned() -> None:
    assert _probe("pin") == "True True"


def test_without_the_pin_glibc_serves_it_from_the_heap_after_a_bigger_block_was_freed() -> None:
    assert _probe("none") == "False False"


def test_an_operators_malloc_setting_wins() -> None:
    assert _probe("pin", MALLOC_MMAP_THRESHOLD_="131072") == "False True"

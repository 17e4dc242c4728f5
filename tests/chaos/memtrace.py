"""``python -m tests.chaos.memtrace ARGS``: ``python -m workers ARGS`` watched from inside, for hunting leaks.

The soak runs the slots named in ``EVENTFLEET_SOAK_TRACE`` through this wrapper. Every
``EVENTFLEET_MEMTRACE_INTERVAL`` seconds (60) a daemon thread appends to ``EVENTFLEET_MEMTRACE_FILE`` one
JSON line: the RSS split into glibc's main heap, anonymous maps (pymalloc's arenas) and files; glibc's own
account (``mallinfo2``: bytes in use by callers, free inside its heaps, mapped); the count of live objects
and the types that grew most; and glibc's ``malloc_info`` XML (free chunks by size) next to it. RSS that
grows while ``in_use`` and the objects stay flat is free space the allocator keeps, not a leak.
``EVENTFLEET_MEMTRACE_TRIM=1`` calls ``malloc_trim(0)`` after each sample and records what it gave back.

With ``EVENTFLEET_MEMTRACE_FRAMES`` > 0 (10) tracemalloc runs too, and each line also has the traced total
and the allocation sites (tracebacks, innermost frame first) that grew most since the previous snapshot
and since a baseline taken after ``EVENTFLEET_MEMTRACE_BASELINE`` seconds (120: warm-up is not a leak).
A site that keeps growing from one snapshot to the next holds what leaks. tracemalloc costs: it about
quadruples the process's RSS, and a snapshot of a busy worker holds the GIL for tens of seconds (its lag
grows meanwhile); use ``EVENTFLEET_MEMTRACE_FRAMES=0`` to watch many processes at once.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

TOP = 15
#: Frames of the import machinery and of tracemalloc itself say nothing about the program.
_IGNORED = (tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<unknown>"))


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(_IGNORED)


def _site(stat: tracemalloc.StatisticDiff) -> dict[str, Any]:
    frames = [f"{frame.filename.removeprefix(str(Path(sys.prefix)))}:{frame.lineno}"
              for frame in reversed(stat.traceback)]  # innermost first
    return {"size_diff_kib": round(stat.size_diff / 1024, 1), "size_kib": round(stat.size / 1024, 1),
            "count_diff": stat.count_diff, "count": stat.count, "traceback": frames[:12]}


def _top(new: tracemalloc.Snapshot, old: tracemalloc.Snapshot) -> list[dict[str, Any]]:
    return [_site(s) for s in new.compare_to(old, "traceback")[:TOP] if s.size_diff > 0]


def _memory_kib() -> dict[str, int]:
    """The process's RSS split by mapping: glibc's main heap (brk), anonymous maps (pymalloc's arenas,
    big mallocs), files."""
    out = {"rss": 0, "heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=6)
        if "-" in first[0] and len(first) >= 5 and ":" not in first[0]:
            name = first[5] if len(first) > 5 else ""
            kind = "heap" if name == "[heap]" else "anon" if not name or name.startswith("[") else "file"
        elif first[0] == "Rss:":
            out[kind] += int(first[1])
            out["rss"] += int(first[1])
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_kib() -> dict[str, int]:
    """glibc's own account (all arenas): bytes in use by malloc's callers, free inside its heaps, mmapped."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use": info.uordblks // 1024, "free": info.fordblks // 1024, "mmapped": info.hblkhd // 1024,
            "heap": info.arena // 1024}


def _malloc_info(path: Path) -> None:
    """glibc's malloc_info(3) XML (free chunks by size, per arena) into path, replacing it."""
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    stream = libc.fopen(str(path).encode(), b"w")
    if stream:
        libc.malloc_info(0, stream)
        libc.fclose(stream)


def _trim_kib() -> int:
    """malloc_trim(0): give the free pages inside glibc's heaps back to the kernel; how much RSS that freed."""
    before = _memory_kib()["rss"]
    ctypes.CDLL(None).malloc_trim(0)
    return before - _memory_kib()["rss"]


def _objects() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def _run(path: Path, interval: float, baseline_after: float) -> None:
    started = time.monotonic()
    baseline: tracemalloc.Snapshot | None = None
    previous: tracemalloc.Snapshot | None = None
    objects = _objects()
    while True:
        time.sleep(interval)
        elapsed = round(time.monotonic() - started)
        now = _objects()
        grown = sorted(((n, now[n] - objects[n]) for n in now), key=lambda item: -item[1])[:10]
        objects = now
        record: dict[str, Any] = {"t": elapsed, "memory_kib": _memory_kib(), "malloc_kib": _malloc_kib(),
                                  "objects": sum(now.values()), "objects_grown": grown}
        _malloc_info(path.with_suffix(".malloc_info.xml"))
        if os.environ.get("EVENTFLEET_MEMTRACE_TRIM"):
            record["trimmed_kib"] = _trim_kib()
        if not tracemalloc.is_tracing():
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            continue
        snap = _snapshot()
        # what the program holds (the snapshots this thread keeps are filtered out)
        record["traced_kib"] = sum(stat.size for stat in snap.statistics("filename")) // 1024
        if baseline is not None:
            record["since_baseline"] = _top(snap, baseline)
        if previous is not None:
            record["since_previous"] = _top(snap, previous)
        if baseline is None and elapsed >= baseline_after:
            baseline = snap
            record["baseline"] = True
        previous = snap
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def main() -> int:
    path = Path(os.environ["EVENTFLEET_MEMTRACE_FILE"])
    interval = float(os.environ.get("EVENTFLEET_MEMTRACE_INTERVAL", "60"))
    baseline_after = float(os.environ.get("EVENTFLEET_MEMTRACE_BASELINE", "120"))
    if frames := int(os.environ.get("EVENTFLEET_MEMTRACE_FRAMES", "10")):  # 0: no tracemalloc, counts only
        tracemalloc.start(frames)
    threading.Thread(target=_run, args=(path, interval, baseline_after), name="memtrace", daemon=True).start()
    from workers.cli import main as cli_main  # imported after start() so that its allocations are traced

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
